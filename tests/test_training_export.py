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


def randomize_batch_norm(model, seed: int = 0) -> None:
    """Non-trivial BN statistics, so a wrong fold shows in the predictions."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            weights = {"gamma": rng.uniform(0.5, 1.5, n), "beta": rng.normal(0, 0.3, n),
                       "moving_mean": rng.normal(0, 0.3, n), "moving_variance": rng.uniform(0.5, 2.0, n)}
            for variable in layer.weights:
                variable.assign(weights[variable.name].astype("float32"))


@pytest.mark.parametrize("arch", ["resnet_v1", "wbnrg"])
def test_fold_batch_norm_keeps_predictions(arch):
    import keras

    from training.export import fold_batch_norm
    from training.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(arch, depth=8)
    randomize_batch_norm(model)
    before = [w.copy() for w in model.get_weights()]
    folded = fold_batch_norm(model)
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(folded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
    # Every BN of these builders follows a linear conv: none is left, and each of those convs gained a bias.
    bns = [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert all(folded.get_layer(name).weights == [] for name in bns)
    # ... and each went into one conv's kernel.
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    rescaled = [name for name in convs if not np.array_equal(
        folded.get_layer(name).kernel.numpy(), model.get_layer(name).kernel.numpy())]
    assert len(rescaled) == len(bns)
    # The original is untouched.
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_fold_batch_norm_leaves_unfoldable_batch_norms():
    import keras
    from keras import layers

    from training.export import fold_batch_norm

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    conv = layers.Conv2D(3, 3, padding="same", name="shared_conv")(inputs)
    x = layers.BatchNormalization(name="bn_after_shared_conv")(conv)
    x = layers.Add(name="add")([x, conv])  # the conv's output also feeds the Add: not foldable
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="relu_conv")(x)
    x = layers.BatchNormalization(name="bn_after_relu_conv")(x)  # not a linear conv
    x = layers.Conv2D(4, 1, use_bias=False, name="plain_conv")(x)
    x = layers.BatchNormalization(center=False, scale=False, name="bn_plain")(x)  # foldable, no beta/gamma
    x = layers.Flatten()(x)
    x = layers.Dense(5, name="dense")(x)
    outputs = layers.BatchNormalization(name="bn_after_dense")(x)  # not after a conv
    model = keras.Model(inputs, outputs)
    randomize_batch_norm(model)
    folded = fold_batch_norm(model)
    kept = {layer.name for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert kept == {"bn_after_shared_conv", "bn_after_relu_conv", "bn_after_dense"}
    assert folded.get_layer("plain_conv").use_bias and not model.get_layer("plain_conv").use_bias
    images = np.random.default_rng(1).normal(0, 1, (4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(folded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
