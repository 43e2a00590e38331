"""Which resize policy best preserves accuracy for photos larger than 32x32? Measured, not guessed.

Real CIFAR-10 test images are turned into photo-like inputs (upscaled, JPEG-compressed, given extra context
or a different aspect ratio), then brought back to 32x32 by each candidate policy (Pillow filter, crop or
squash, reducing_gap, JPEG draft decoding) and classified by a trained model. The policy whose accuracy stays
closest to the original 32x32 images' accuracy wins. Also reports the cost per image of each policy on a
1024x768 photo, and how closely the Pillow policy matches the model's in-graph decoding (predict_images).

    python bench/bench_resize_policy.py --model models/cifar10/1 [--images 2000]
    python bench/bench_resize_policy.py --model runs/fast-r20          # a run's best.keras, read only
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.preprocessing import load_image, preprocess  # noqa: E402
from training.data import load_cifar10  # noqa: E402

R = Image.Resampling
FILTERS = {"nearest": R.NEAREST, "box": R.BOX, "bilinear": R.BILINEAR, "hamming": R.HAMMING,
           "bicubic": R.BICUBIC, "lanczos": R.LANCZOS}


# ---- photo-like inputs from 32x32 originals ----------------------------------------------------------------


def reflect_pad(img: Image.Image, width: int, height: int) -> Image.Image:
    """More scene around the object: the content stays square in the middle, context is mirrored around it."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    top, left = (height - h) // 2, (width - w) // 2
    a = np.pad(a, ((top, height - h - top), (left, width - w - left), (0, 0)), mode="reflect")
    return Image.fromarray(a)


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def grain(img: Image.Image, sigma: float = 10.0) -> Image.Image:
    """Sensor noise at the photo's own resolution: the high-frequency detail a real photo has and an upscaled
    32x32 image lacks. Without it, NEAREST looks best only because it samples the original pixels back."""
    rng = np.random.default_rng(img.size[0] * 7919 + int(np.asarray(img)[0, 0, 0]))
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


SCENARIOS = {
    # name: (make(image) -> encoded bytes, description). Sizes are non-integer multiples of 32 on purpose.
    "100x100 png": (lambda im: png(grain(im.resize((100, 100), R.LANCZOS))), "3.1x upscale (Lanczos) + grain"),
    "250x250 jpeg85": (lambda im: jpeg(grain(im.resize((250, 250), R.BICUBIC)), 85),
                       "7.8x upscale (bicubic) + grain, JPEG q85"),
    "150x120 context": (lambda im: png(grain(reflect_pad(im.resize((120, 120), R.BICUBIC), 150, 120))),
                        "3.75x upscale + grain, wider scene (5:4): extra context left and right"),
    "150x120 stretched": (lambda im: png(grain(im.resize((150, 120), R.BICUBIC))),
                          "non-uniform upscale to 5:4 + grain: the object itself is stretched"),
    "480x640 jpeg90 context": (lambda im: jpeg(grain(reflect_pad(im.resize((470, 470), R.BICUBIC), 480, 640)), 90),
                               "14.7x upscale + grain, portrait 3:4 phone-like, context above and below, JPEG q90"),
}


# ---- candidate policies -------------------------------------------------------------------------------------


def policy(resample: int, crop: bool, reducing_gap: float | None = None, draft: int | None = None):
    def apply(data: bytes) -> np.ndarray:
        img = load_image(data, min_size=draft)
        w, h = img.size
        box = None
        if crop and w != h:
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.asarray(img.resize((32, 32), resample, box=box, reducing_gap=reducing_gap))
    return apply


def policies() -> dict:
    out = {}
    for mode in ("crop", "squash"):
        for name, f in FILTERS.items():
            out[f"{mode} {name}"] = policy(f, mode == "crop")
    out["crop bicubic reducing_gap=2"] = policy(R.BICUBIC, True, 2.0)
    out["crop bicubic reducing_gap=3"] = policy(R.BICUBIC, True, 3.0)
    out["crop bicubic jpeg-draft>=64"] = policy(R.BICUBIC, True, None, 64)
    out["crop bicubic jpeg-draft>=128"] = policy(R.BICUBIC, True, None, 128)
    out["gateway (preprocess)"] = preprocess
    out["crop lanczos jpeg-draft>=64"] = policy(R.LANCZOS, True, None, 64)
    out["crop lanczos reducing_gap=3"] = policy(R.LANCZOS, True, 3.0)
    return out


# ---- model ------------------------------------------------------------------------------------------------


def load_model(path: Path):
    """A predict(uint8 [N,32,32,3]) -> probabilities function, and the graph's encoded-image function."""
    import tensorflow as tf

    if (path / "saved_model.pb").exists():
        loaded = tf.saved_model.load(str(path))
        pixels = loaded.signatures["serving_default"]
        encoded = loaded.signatures["predict_images"]

        def predict(x):
            return np.concatenate([pixels(images=tf.constant(x[i:i + 500]))["probabilities"].numpy()
                                   for i in range(0, len(x), 500)])

        def predict_bytes(blobs):
            return np.concatenate([encoded(image_bytes=tf.constant(blobs[i:i + 200]))["probabilities"].numpy()
                                   for i in range(0, len(blobs), 200)])
        return predict, predict_bytes
    from training.evaluate import load_float32_model

    model = load_float32_model(path)

    def predict(x):
        return model.predict(x.astype(np.float32), batch_size=500, verbose=0)
    return predict, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "cifar10" / "1",
                        help="a SavedModel version folder, or a training run folder (best.keras)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar-10-python.tar.gz"))
    parser.add_argument("--images", type=int, default=2000, help="test images per scenario")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()

    test = load_cifar10(args.data).test.take(args.images)
    predict, predict_bytes = load_model(args.model)
    labels = test.labels.astype(int)
    base = float((predict(test.images).argmax(1) == labels).mean())
    print(f"model {args.model}, {len(labels)} CIFAR-10 test images; accuracy on the original 32x32: {base:.4f}\n")
    pols = policies()
    results: dict[str, dict[str, float]] = {}
    for scenario in args.scenarios:
        make, what = SCENARIOS[scenario]
        blobs = [make(Image.fromarray(img)) for img in test.images]
        print(f"## {scenario}: {what}", flush=True)
        results[scenario] = {}
        for name, apply in pols.items():
            x = np.stack([apply(b) for b in blobs])
            acc = float((predict(x).argmax(1) == labels).mean())
            results[scenario][name] = acc
            print(f"  {name:32s} {acc:.4f}", flush=True)
        if predict_bytes is not None:
            acc = float((predict_bytes(blobs).argmax(1) == labels).mean())
            results[scenario]["in-graph (predict_images)"] = acc
            print(f"  {'in-graph (predict_images)':32s} {acc:.4f}")
            # Same photo, two paths: the gateway's preprocessing vs the graph's decode+resize.
            ours = predict(np.stack([preprocess(b) for b in blobs])).argmax(1)
            print(f"  top-1 agreement gateway vs graph: {(ours == predict_bytes(blobs).argmax(1)).mean():.4f}")

    print(f"\n## mean accuracy over scenarios (original 32x32: {base:.4f})")
    names = list(pols) + (["in-graph (predict_images)"] if predict_bytes is not None else [])
    ranked = sorted(names, key=lambda n: -np.mean([results[s][n] for s in results]))
    header = "| policy | " + " | ".join(results) + " | mean |"
    print(header)
    print("|" + "---|" * (len(results) + 2))
    for n in ranked:
        row = [results[s][n] for s in results]
        print(f"| {n} | " + " | ".join(f"{v:.4f}" for v in row) + f" | {np.mean(row):.4f} |")

    # Cost of each policy on one 1024x768 JPEG photo.
    photo = jpeg(reflect_pad(Image.fromarray(test.images[0]).resize((768, 768), R.BICUBIC), 1024, 768), 90)
    print("\n## time per 1024x768 JPEG (decode + resize), ms")
    for name in ("crop nearest", "crop bilinear", "crop bicubic", "crop lanczos", "crop bicubic reducing_gap=2",
                 "crop bicubic jpeg-draft>=64", "crop bicubic jpeg-draft>=128", "crop lanczos jpeg-draft>=64",
                 "crop lanczos reducing_gap=3"):
        apply = pols[name]
        apply(photo)
        t0 = time.perf_counter()
        for _ in range(20):
            apply(photo)
        print(f"  {name:32s} {(time.perf_counter() - t0) / 20 * 1000:.1f}")


if __name__ == "__main__":
    main()
