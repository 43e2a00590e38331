"""Image decoding and resizing for the model: the one home of this logic, shared by the gateway and the CLI.

`load_image` turns the bytes of any format Pillow reads into an upright RGB image (EXIF orientation applied,
first frame of an animation, transparency composited over white, high-bit-depth and exotic modes scaled to
8-bit RGB, embedded ICC profiles converted to sRGB), refusing hostile input with an `ImageError` whose `code`
is stable. `to_model_input` applies the resize policy and stacks images into the model's uint8 [N, 32, 32, 3].

Resize policy (measured by bench/bench_resize_policy.py, see docs/gateway.md): centre crop to a square (as the
model's encoded-image signature does in its graph), then Pillow's antialiased Lanczos resize to 32x32. On
photo-like versions of the CIFAR-10 test images Lanczos kept about one point more accuracy than bicubic and
matched the accuracy of the original 32x32 images; bilinear lost 7 points and nearest 27.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from client.contract import IMAGE_SIZE

# ~40 megapixels: a 48 MP phone photo at 8000x6000 is rejected, a 24 MP camera one is accepted. Decoding
# costs about 4 bytes per pixel, so this bounds a single image to ~160 MB of memory.
DEFAULT_MAX_PIXELS = 40_000_000

RESAMPLE = Image.Resampling.LANCZOS  # antialiased for downscaling: Pillow widens the kernel by the scale
CROP = True  # centre crop to a square before resizing (keeps the aspect ratio of what is photographed)
# `preprocess` lets the JPEG decoder scale down by 2, 4 or 8 while both sides stay >= 64: 5-10x cheaper for
# phone photos, with no measurable loss of accuracy (docs/gateway.md).
DRAFT_MIN_SIZE = 64

# Decompression-bomb limits are enforced per call (max_pixels below); keep Pillow's global guard as a backstop
# but never let its warning become the only defence or spam logs.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An input that cannot be turned into a model input. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ImageError({self.code!r}, {self.message!r})"


# Signatures of common formats: a file that starts like one but that Pillow cannot open is a broken image
# (truncated, zero-sized, corrupt), not "not an image".
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _header_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """Width and height as the header states them, for the formats whose header Pillow rejects at zero."""
    try:
        if kind == "PNG" and len(data) >= 24:
            return struct.unpack(">II", data[16:24])
        if kind == "BMP" and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if kind == "JPEG":
            for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
                i = data.find(marker)
                if i >= 0 and len(data) >= i + 9:
                    height, width = struct.unpack(">HH", data[i + 5:i + 9])
                    return width, height
    except struct.error:
        return None
    return None


def _broken(data: bytes, kind: str, detail: str) -> ImageError:
    size = _header_size(data, kind)
    if size is not None and 0 in size:
        return ImageError("zero_size_image", f"the {kind} image has no pixels ({size[0]}x{size[1]})")
    if len(data) < 64 or "truncated" in detail.lower():
        return ImageError("truncated_image", f"the {kind} image is truncated ({len(data)} bytes)")
    return ImageError("invalid_image", f"the {kind} image is corrupt: {detail}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind:
            raise _broken(data, kind, "the header cannot be parsed") from None
        raise ImageError("not_an_image", "the data is not an image in a format Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", f"the image has too many pixels: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header can raise almost anything inside a plugin
        raise _broken(data, _sniff(data) or "", _short(exc)) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("zero_size_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "image_too_large",
            f"the image has {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
        )
    return image


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def _decode(image: Image.Image) -> Image.Image:
    """Load the first frame's pixels; map decoder failures to stable codes."""
    try:
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_large", f"the image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
        text = str(exc).lower()
        if "truncated" in text or "broken data stream" in text or isinstance(exc, EOFError) or "premature" in text:
            raise ImageError("truncated_image", f"the image data is truncated: {_short(exc)}") from None
        raise ImageError("invalid_image", f"the image data cannot be decoded: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - plugins raise assorted errors on hostile data; never a 500
        raise ImageError("invalid_image", f"the image data cannot be decoded: {_short(exc)}") from None
    return image


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """I;16*, I and F modes: scale to 0..255 instead of Pillow's clipping convert("L")."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = array / 257.0
    else:
        finite = array[np.isfinite(array)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = array * 255.0  # floats in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            scaled = array  # already 8-bit values
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = array / 257.0  # 16-bit samples (PNG 16-bit grey opens as "I")
        else:
            scaled = (array - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(array)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert from an embedded ICC profile (e.g. Display P3 phone photos) to sRGB; ignore broken profiles."""
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return image
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        out_mode = "RGBA" if image.mode in ("RGBA", "LA") else "RGB"
        converted = ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
        return converted if converted is not None else image
    except Exception:  # noqa: BLE001 - a malformed or unsupported profile: keep the pixels as they are
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8bit_gray(image)
    image = _to_srgb(image)
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        if image.mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_image_mode", f"cannot convert image mode {image.mode} to RGB: {exc}") from None


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    """Decode `data` into an upright RGB image (first frame), or raise ImageError.

    `min_size`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster) as long as
    both sides stay at least `min_size` pixels; None decodes at full size.
    Codes: empty_image, not_an_image, invalid_image, truncated_image, zero_size_image, image_too_large,
    unsupported_image_mode.
    """
    image = _open(bytes(data) if not isinstance(data, bytes) else data, max_pixels)
    if min_size and image.format == "JPEG":
        try:
            image.draft(image.mode, (min_size, min_size))
        except Exception:  # noqa: BLE001 - draft is only an optimisation
            pass
    image = _decode(image)
    try:
        # EXIF orientation: phones store pixels sideways and a tag saying how to turn them.
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - malformed EXIF must not reject an otherwise good image
        pass
    try:
        return _to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageError("invalid_image", f"the image cannot be converted to RGB: {_short(exc)}") from None


def resize(image: Image.Image, *, crop: bool = CROP, resample: int = RESAMPLE) -> Image.Image:
    """The resize policy: centre crop to a square (if `crop`), then resize to 32x32 with `resample`."""
    width, height = image.size
    if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    box = None
    if crop and width != height:
        side = min(width, height)
        # Same offsets as the graph's crop_to_bounding_box((h - side) // 2, (w - side) // 2).
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), resample=resample, box=box)


def to_model_input(images: Iterable[Image.Image]) -> np.ndarray:
    """Resize RGB images with the policy above and stack them: uint8 [N, 32, 32, 3]."""
    arrays = [np.asarray(resize(img if img.mode == "RGB" else img.convert("RGB")), dtype=np.uint8)
              for img in images]
    if not arrays:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack(arrays)


def preprocess(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int | None = DRAFT_MIN_SIZE) -> np.ndarray:
    """Bytes of one image to its model input, uint8 [32, 32, 3]."""
    return np.asarray(resize(load_image(data, max_pixels=max_pixels, min_size=min_size)), dtype=np.uint8)
