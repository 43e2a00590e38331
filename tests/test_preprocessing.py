"""client/preprocessing.py: formats, modes, orientation, animation, resize policy, and hostile input."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from client.preprocessing import ImageError, load_image, preprocess, resize, to_model_input


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def test_32x32_rgb_png_passes_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = preprocess(encode(Image.fromarray(pixels), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, pixels)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "TGA", "ICO", "PCX"])
def test_formats(fmt):
    image = load_image(encode(solid((200, 30, 30), (48, 48)), fmt))
    assert image.mode == "RGB"
    r, g, b = np.asarray(image).reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80


def test_exif_orientation_is_applied():
    # Left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise to display": red on top.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(encode(Image.fromarray(pixels), "PNG", exif=exif))
    assert image.size == (20, 40)
    arr = np.asarray(image)
    assert tuple(arr[5, 10]) == (255, 0, 0) and tuple(arr[35, 10]) == (0, 0, 255)


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    arr = np.asarray(load_image(encode(rgba, "PNG")))
    assert tuple(arr[4, 4]) == (255, 255, 255) and tuple(arr[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (8, 8), (0, 128))  # black at half alpha -> mid grey
    assert abs(int(np.asarray(load_image(encode(la, "PNG")))[0, 0, 0]) - 127) <= 2
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    arr = np.asarray(load_image(encode(p, "PNG", transparency=0)))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[1, 1]) == (0, 255, 0)
    gif = np.asarray(load_image(encode(p, "GIF", transparency=0)))
    assert tuple(gif[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("CMYK", "TIFF"),
                                      ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("YCbCr", "JPEG"),
                                      ("LAB", "TIFF")])
def test_modes_become_rgb(mode, fmt):
    image = load_image(encode(Image.new("RGB", (16, 16), (90, 90, 90)).convert(mode), fmt))
    assert image.mode == "RGB" and image.size == (16, 16)


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    out = np.asarray(load_image(encode(Image.fromarray(values), "PNG")))[0, :, 0]
    assert list(out) == [0, 128, 255, 4]


def test_float_image_in_unit_range():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(load_image(encode(Image.fromarray(values, "F"), "TIFF")))[0, :, 0]
    assert list(out) == [0, 128, 255]


def test_first_frame_of_animation():
    frames = [solid((255, 0, 0), (16, 16)), solid((0, 0, 255), (16, 16))]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        r, g, b = np.asarray(load_image(data))[8, 8]
        assert r > 200 and b < 50, fmt


def test_resize_policy_centre_crops_then_resizes():
    # 64x32 wide: green bands on the left and right quarters are cropped away, the red centre remains.
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16] = (0, 255, 0)
    pixels[:, 48:] = (0, 255, 0)
    pixels[:, 16:48] = (255, 0, 0)
    out = np.asarray(resize(Image.fromarray(pixels)))
    assert out.shape == (32, 32, 3)
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all()
    batch = to_model_input([Image.fromarray(pixels), solid((1, 2, 3), (200, 100))])
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    assert to_model_input([]).shape == (0, 32, 32, 3)


def test_large_jpeg_with_draft_decoding_matches_full_decoding():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(small).resize((1024, 1024), Image.Resampling.BICUBIC), "JPEG", quality=95)
    full = preprocess(data, min_size=None).astype(int)
    fast = preprocess(data).astype(int)
    assert np.abs(full - fast).mean() < 3


def png_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def code_of(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        load_image(data, **kw)
    assert info.value.message
    return info.value.code


def test_error_codes():
    jpeg = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    png = encode(Image.effect_noise((64, 64), 60), "PNG")
    assert code_of(b"") == "empty_image"
    assert code_of(b"hello, this is not an image at all" * 10) == "not_an_image"
    assert code_of(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "not_an_image"
    assert code_of(jpeg[: len(jpeg) // 2]) == "truncated_image"
    assert code_of(png[: len(png) // 2]) == "truncated_image"
    assert code_of(png[:20]) == "truncated_image"
    assert code_of(png_with_size(0, 5)) == "zero_size_image"
    assert code_of(png_with_size(100_000, 100_000)) == "image_too_large"  # a decompression bomb header
    assert code_of(encode(solid((0, 0, 0), (100, 100)), "PNG"), max_pixels=5_000) == "image_too_large"


def test_decompression_bomb_is_refused_before_decoding():
    # 20000x20000 black PNG compresses to ~400 KB but would take 1.2 GB decoded.
    bomb = encode(Image.new("L", (20_000, 20_000)), "PNG", optimize=False)
    assert len(bomb) < 2_000_000
    assert code_of(bomb) == "image_too_large"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_broken_icc_profile_and_exif_are_ignored():
    data = encode(solid((10, 200, 10), (8, 8)), "JPEG", icc_profile=b"not a real profile" * 20)
    assert load_image(data).size == (8, 8)
    png = encode(solid((10, 200, 10), (8, 8)), "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert load_image(png).size == (8, 8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF/EXIF it survives
def test_mutated_files_never_raise_anything_but_image_error():
    rng = random.Random(0)
    seeds = [encode(Image.effect_noise((48, 40), 50).convert(m), f) for m, f in
             (("RGB", "JPEG"), ("RGB", "PNG"), ("P", "GIF"), ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"))]
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            out = preprocess(bytes(data))
            assert out.shape == (32, 32, 3)
        except ImageError as exc:
            assert exc.code in {"not_an_image", "invalid_image", "truncated_image", "zero_size_image",
                                "image_too_large", "unsupported_image_mode"}
