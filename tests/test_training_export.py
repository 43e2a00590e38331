"""The exported version: layout, both signatures in a fresh process, warm-up records, metadata, atomicity."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from client import contract
from tests.conftest import ROOT


def test_version_layout_and_metadata(exported_model):
    assert exported_model.name == "1"
    for path in ("saved_model.pb", "variables/variables.index", contract.WARMUP_FILE, contract.METADATA_FILE,
                 "assets.extra/evaluation.json", "assets.extra/learning_curves.png",
                 "assets.extra/confusion_matrix.png"):
        assert (exported_model / path).is_file(), path
    meta = json.loads((exported_model / contract.METADATA_FILE).read_text())
    assert meta["model_name"] == "cifar10" and meta["version"] == 1
    assert meta["architecture"] == "resnet_v1" and meta["depth"] == 8 and meta["recipe"] == "fast"
    assert meta["data_sha256"] == "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a"
    assert 0 <= meta["test_accuracy"] <= 1 and meta["epochs"] == 1
    assert meta["verified_max_abs_diff"] <= 1e-5
    assert meta["class_names"] == list(contract.CLASS_NAMES)
    assert meta["code_revision"] and meta["created"]
    # No temporary folders are left beside the version.
    assert [p.name for p in exported_model.parent.iterdir()] == ["1"]


def test_warmup_records_are_prediction_logs(exported_model):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(str(exported_model / contract.WARMUP_FILE)).as_numpy_iterator())
    assert 1 <= len(records) <= 1000
    signatures = set()
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        request = log.predict_log.request
        assert request.model_spec.name == "cifar10"
        signatures.add(request.model_spec.signature_name)
    assert signatures == {contract.DEFAULT_SIGNATURE, contract.IMAGES_SIGNATURE}


SIGNATURE_CHECK = r"""
import io, sys, json
import numpy as np, tensorflow as tf
from PIL import Image
m = tf.saved_model.load(sys.argv[1])
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
out = {k: v.numpy() for k, v in m.signatures["serving_default"](images=tf.constant(pixels)).items()}
def encode(img, fmt, **kw):
    buf = io.BytesIO(); img.save(buf, fmt, **kw); return buf.getvalue()
big = Image.fromarray(np.kron(pixels[0], np.ones((4, 4, 1), np.uint8)))  # 128x128, same picture
gif = Image.fromarray(pixels[1]).convert("P")
encoded = [encode(Image.fromarray(pixels[0]), "PNG"), encode(Image.fromarray(pixels[1]), "BMP"),
           encode(big, "JPEG", quality=95), encode(gif, "GIF")]
res = {k: v.numpy() for k, v in m.signatures["predict_images"](image_bytes=tf.constant(encoded)).items()}
print(json.dumps({
    "default_keys": sorted(out), "bytes_keys": sorted(res),
    "png_diff": float(np.abs(res["probabilities"][0] - out["probabilities"][0]).max()),
    "bmp_diff": float(np.abs(res["probabilities"][1] - out["probabilities"][1]).max()),
    "sum": res["probabilities"].sum(1).tolist(),
    "names": [n.decode() for n in res["class_names"]],
    "ids": res["class_ids"].tolist(),
    "classes": [n.decode() for n in res["classes"][0]],
}))
"""


def test_both_signatures_in_a_fresh_process(exported_model):
    proc = subprocess.run([sys.executable, "-c", SIGNATURE_CHECK, str(exported_model)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = sorted([contract.PROBABILITIES, contract.CLASS_IDS, contract.CLASS_LABELS, contract.CLASSES])
    assert result["default_keys"] == keys and result["bytes_keys"] == keys
    assert result["png_diff"] <= 1e-6 and result["bmp_diff"] <= 1e-6  # lossless 32x32: same pixels
    assert result["sum"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert result["classes"] == list(contract.CLASS_NAMES)  # a caller names classes without outside knowledge
    assert result["names"] == [contract.CLASS_NAMES[i] for i in result["ids"]]


def test_failed_verification_publishes_nothing(tmp_path, monkeypatch):
    from training import export
    from training.model import resnet_v1

    monkeypatch.setattr(export, "MAX_ABS_DIFF", -1.0)  # any real difference (even 0) now fails the check
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    base = tmp_path / "cifar10"
    with pytest.raises(export.ExportError, match="differs"):
        export.export_model(resnet_v1(8), base, {}, images)
    assert list(base.iterdir()) == []


def test_next_version_and_warm_start(tmp_path, exported_model):
    import keras

    from training.export import next_version
    from training.train import load_weights_from

    base = tmp_path / "cifar10"
    for name in ("1", "3", "tmp", ".export-x"):
        (base / name).mkdir(parents=True)
    assert next_version(base) == 4
    from training.model import resnet_v1

    keras.utils.set_random_seed(1)
    model = resnet_v1(8)
    load_weights_from(model, str(exported_model))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    import tensorflow as tf

    served = tf.saved_model.load(str(exported_model)).signatures["serving_default"]
    pixels = np.asarray(image)[None]
    want = served(images=tf.constant(pixels))["probabilities"].numpy()
    got = model.predict(pixels.astype("float32"), verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
