"""Export a trained run as the next servable version of `models/cifar10` (SPEC section 6).

The version is written to a hidden temporary folder (TF Serving skips names that are not integers),
verified in a fresh process against the Keras model, and only then renamed to its integer name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client import contract
from training.data import load_cifar10

if TYPE_CHECKING:
    from collections.abc import Callable

    import keras

log = logging.getLogger("training")

VERIFY_IMAGES = 256
MAX_ABS_DIFF = 1e-5


class ExportError(Exception):
    """The exported model does not reproduce the Keras model; nothing was published."""


def serving_functions(model: keras.Model) -> tuple[Callable, Callable]:
    """The two signatures as tf.functions over a float32 Keras model taking raw 0..255 pixels."""
    import tensorflow as tf

    names = tf.constant(contract.CLASS_NAMES)

    def outputs(probabilities):
        ids = tf.argmax(probabilities, axis=1)
        batch = tf.shape(probabilities)[0]
        return {
            contract.PROBABILITIES: probabilities,
            contract.CLASS_IDS: ids,
            contract.CLASS_LABELS: tf.gather(names, ids),
            contract.CLASSES: tf.tile(names[None, :], [batch, 1]),
        }

    def predict_pixels(images):
        return outputs(model(tf.cast(images, tf.float32), training=False))

    def decode(encoded):
        # First frame of animations; alpha dropped. Centre crop to a square (keeps the aspect ratio), then an
        # antialiased Lanczos resize, as the shared Pillow preprocessing does (chosen by measurement, see
        # docs/gateway.md); 32x32 images pass unchanged.
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        shape = tf.shape(image)
        h, w = shape[0], shape[1]
        side = tf.minimum(h, w)
        image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)

        def resize():
            resized = tf.image.resize(image, [contract.IMAGE_SIZE] * 2, method="lanczos3", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

        return tf.cond(side == contract.IMAGE_SIZE, lambda: image, resize)

    def predict_bytes(image_bytes):
        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec([32, 32, 3], tf.uint8))
        return predict_pixels(images)

    return predict_pixels, predict_bytes


def _tensor_refs(value: object) -> list[tuple[str, int, int]]:
    """The (layer, node, tensor) of every Keras tensor in an inbound node's args/kwargs, however nested."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, node, index = value["config"]["keras_history"]
            return [(name, int(node), int(index))]
        return [ref for v in value.values() for ref in _tensor_refs(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _tensor_refs(v)]
    return []


def _output_refs(value: object) -> list[tuple[str, int, int]]:
    """The (layer, node, tensor) triples of a functional config's `output_layers`, however nested."""
    if isinstance(value, (list, tuple)):
        if len(value) == 3 and isinstance(value[0], str) and all(isinstance(v, int) for v in value[1:]):
            return [(value[0], value[1], value[2])]
        return [ref for v in value for ref in _output_refs(v)]
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _output_refs(v)]
    return []


def _foldable_pairs(model: keras.Model) -> dict[str, str]:
    """BatchNormalization name -> name of the Conv2D it can be folded into (see `fold_batch_norm`)."""
    import keras

    config = model.get_config()
    entries = {entry["name"]: entry for entry in config.get("layers", [])}
    consumers: dict[tuple[str, int, int], int] = {}
    for entry in entries.values():
        for node in entry.get("inbound_nodes") or []:
            for ref in _tensor_refs(node):
                consumers[ref] = consumers.get(ref, 0) + 1
    for ref in _output_refs(config.get("output_layers", [])):
        consumers[ref] = consumers.get(ref, 0) + 1  # a model output is a consumer too

    pairs = {}
    for name, entry in entries.items():
        nodes = entry.get("inbound_nodes") or []
        if entry.get("class_name") != "BatchNormalization" or len(nodes) != 1:
            continue
        refs = _tensor_refs(nodes[0])
        if len(refs) != 1 or nodes[0].get("kwargs", {}).get("training") is True:
            continue
        source = refs[0]
        conv_entry = entries.get(source[0])
        if conv_entry is None or conv_entry.get("class_name") != "Conv2D" or source[1:] != (0, 0):
            continue
        if len(conv_entry.get("inbound_nodes") or []) != 1 or consumers.get(source) != 1:
            continue  # a shared conv, or its output also feeds another layer or the model's outputs
        conv, bn = model.get_layer(source[0]), model.get_layer(name)
        if type(conv) is not keras.layers.Conv2D or not isinstance(bn, keras.layers.BatchNormalization):
            continue
        if conv_entry["config"].get("activation") not in ("linear", None):
            continue
        channel_axis = 1 if conv.data_format == "channels_first" else 3
        axis = bn.axis[0] if isinstance(bn.axis, (list, tuple)) and len(bn.axis) == 1 else bn.axis
        if not isinstance(axis, int) or axis % 4 != channel_axis:
            continue
        pairs[name] = source[0]
    return pairs


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """An inference copy of a functional `model` in which every BatchNormalization whose only input is a Conv2D
    (that conv feeding nothing else, with linear activation) is folded into that conv's kernel and bias.

    The folded BN becomes a pass-through layer of the same name; every other layer is a copy with the same
    weights. Keras 3 runs BN at inference as separate element-wise ops, so TF's grappler cannot fuse
    conv + bias + add + relu into one oneDNN kernel; after folding it can. Only for inference: the copy has
    no BN statistics left to train. `model` itself is not changed.
    """
    import keras

    pairs = _foldable_pairs(model)
    folded_convs = {conv: bn for bn, conv in pairs.items()}

    class FoldedBatchNormalization(keras.layers.Layer):
        """Pass-through left where a BatchNormalization was folded into the preceding Conv2D."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True

        def call(self, inputs, training=None, mask=None):
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer.name in pairs:
            return FoldedBatchNormalization(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if layer.name in folded_convs:
            config = {**config, "use_bias": True}
        return layer.__class__.from_config(config)

    def f64(variable: keras.Variable) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)

    folded = keras.models.clone_model(model, clone_function=clone)
    originals = {layer.name: layer for layer in model.layers}
    for layer in folded.layers:
        if layer.name in pairs or isinstance(layer, keras.layers.InputLayer):
            continue  # clone_model names new inputs after their tensors; neither has weights
        original = originals[layer.name]
        if layer.name not in folded_convs:
            layer.set_weights(original.get_weights())
            continue
        bn = originals[folded_convs[layer.name]]
        kernel = f64(original.kernel)
        bias = f64(original.bias) if original.use_bias else np.zeros(kernel.shape[-1])
        mean, variance = f64(bn.moving_mean), f64(bn.moving_variance)
        gamma = f64(bn.gamma) if bn.scale else np.ones_like(mean)
        beta = f64(bn.beta) if bn.center else np.zeros_like(mean)
        s = gamma / np.sqrt(variance + bn.epsilon)  # per output channel, the kernel's last axis
        dtype = np.dtype(layer.kernel.dtype)
        layer.set_weights([(kernel * s).astype(dtype), ((bias - mean) * s + beta).astype(dtype)])
    return folded


def write_saved_model(model: keras.Model, path: Path) -> None:
    import keras
    import tensorflow as tf

    # Serving runs the BN-folded copy (fused conv kernels, faster on CPU); the export is still verified against
    # `model` itself. The archive saves the variables its endpoints use (the folded copy's) by itself; tracking
    # the folded copy as well would store them twice. `model`'s own weights are kept for `train --warm-start`.
    predict_pixels, predict_bytes = serving_functions(fold_batch_norm(model))
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        contract.DEFAULT_SIGNATURE, predict_pixels,
        input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name=contract.PIXELS_INPUT)],
    )
    archive.add_endpoint(
        contract.IMAGES_SIGNATURE, predict_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=contract.BYTES_INPUT)],
    )
    # Lets `train --warm-start models/cifar10/N` read the weights back in the builder's order.
    archive.add_variable_collection("model_weights", model.weights)
    archive.write_out(str(path), verbose=False)


def write_warmup(path: Path, images: np.ndarray) -> None:
    """TF Serving replays these PredictRequests at load, so the first real request finds warm kernels."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    def record(signature: str, key: str, tensor) -> bytes:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=contract.MODEL_NAME, signature_name=signature)
        )
        request.inputs[key].CopyFrom(tf.make_tensor_proto(tensor))
        return prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        ).SerializeToString()

    png = [tf.io.encode_png(img).numpy() for img in images[:2]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (1, 8, 32, 64):  # the batch sizes the batcher forms
            writer.write(record(contract.DEFAULT_SIGNATURE, contract.PIXELS_INPUT, images[:batch]))
        writer.write(record(contract.IMAGES_SIGNATURE, contract.BYTES_INPUT, np.array(png, dtype=object)))


def code_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.exists() else []
    return max(versions, default=0) + 1


def verify_saved_model(path: Path, expected: Path) -> float:
    """Run in a fresh process: both signatures must reproduce the Keras probabilities."""
    import tensorflow as tf

    data = np.load(expected)
    images, want = data["images"], data["probabilities"]
    loaded = tf.saved_model.load(str(path))
    got = loaded.signatures[contract.DEFAULT_SIGNATURE](**{contract.PIXELS_INPUT: tf.constant(images)})
    png = tf.constant([tf.io.encode_png(img).numpy() for img in images])
    got_bytes = loaded.signatures[contract.IMAGES_SIGNATURE](**{contract.BYTES_INPUT: png})
    diff = max(
        float(np.abs(got[contract.PROBABILITIES].numpy() - want).max()),
        float(np.abs(got_bytes[contract.PROBABILITIES].numpy() - want).max()),
    )
    names = got_bytes[contract.CLASS_LABELS].numpy()
    if [n.decode() for n in names] != [contract.CLASS_NAMES[i] for i in want.argmax(1)]:
        raise ExportError("class names of the image signature disagree with the probabilities")
    return diff


def export_model(
    model: keras.Model,
    base_path: str | Path,
    metadata: dict,
    verify_images: np.ndarray,
    extra_files: tuple[Path, ...] = (),
) -> Path:
    """Write, verify and publish `model` as the next version under `base_path`; returns its folder.

    `extra_files` (evaluation, plots) go to `assets.extra/`, which servers read only for warm-up.
    """
    base = Path(base_path)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=base))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model server may run as another user
        write_saved_model(model, tmp)
        write_warmup(tmp / contract.WARMUP_FILE, verify_images[:64])
        for extra in extra_files:
            shutil.copy2(extra, tmp / "assets.extra" / extra.name)
        expected = tmp.parent / f"{tmp.name}.npz"
        want = model.predict(verify_images.astype(np.float32), batch_size=256, verbose=0)
        np.savez(expected, images=verify_images, probabilities=want)
        proc = subprocess.run(
            [sys.executable, "-m", "training.export", "verify", str(tmp), str(expected)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
        )
        expected.unlink()
        if proc.returncode != 0:
            raise ExportError(f"verification of the export failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        diff = float(proc.stdout.strip().splitlines()[-1])
        if not diff <= MAX_ABS_DIFF:
            raise ExportError(f"exported model differs from the Keras model by {diff:.3g} > {MAX_ABS_DIFF}")
        while True:
            version = next_version(base)
            meta = {**metadata, "model_name": contract.MODEL_NAME, "version": version,
                    "verified_max_abs_diff": diff, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "code_revision": code_revision()}
            (tmp / contract.METADATA_FILE).write_text(json.dumps(meta, indent=2))
            try:
                os.rename(tmp, base / str(version))  # atomic; fails if another export took the number
                break
            except OSError:
                if not (base / str(version)).exists():
                    raise
        log.info("exported version %d to %s (max abs diff %.2g)", version, base / str(version), diff)
        return base / str(version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_run(run_dir: str | Path, base_path: str | Path, data: str | None = None) -> Path:
    """Export the run's best model, with its evaluation and plots under assets.extra/."""
    from training.evaluate import (
        CONFUSION_PNG,
        CURVES_PNG,
        EVALUATION_FILE,
        evaluate_run,
        load_float32_model,
        run_config,
    )

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    evaluation_path = run_dir / EVALUATION_FILE
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else evaluate_run(run_dir, data)
    model = load_float32_model(run_dir)
    test = load_cifar10(data or cfg.data).test
    metadata = {
        "architecture": cfg.arch, "depth": cfg.depth if cfg.arch == "resnet_v1" else None,
        "parameters": int(model.count_params()), "recipe": cfg.recipe, "epochs": evaluation["epochs_trained"],
        "best_epoch": evaluation["best_epoch"], "val_accuracy": evaluation["best_val_accuracy"],
        "test_accuracy": evaluation["test_accuracy"], "data_sha256": evaluation["data_sha256"],
        "config": json.loads((run_dir / "config.json").read_text()),
        "signatures": {
            contract.DEFAULT_SIGNATURE: {"inputs": {contract.PIXELS_INPUT: "uint8 [-1, 32, 32, 3]"}},
            contract.IMAGES_SIGNATURE: {"inputs": {contract.BYTES_INPUT: "string [-1]"}},
            "outputs": [contract.PROBABILITIES, contract.CLASS_IDS, contract.CLASS_LABELS, contract.CLASSES],
        },
        "class_names": list(contract.CLASS_NAMES),
    }
    # The run's evidence travels with the version it produced.
    extras = tuple(run_dir / n for n in (EVALUATION_FILE, CURVES_PNG, CONFUSION_PNG, "log.csv")
                   if (run_dir / n).exists())
    return export_model(model, base_path, metadata, test.images[:VERIFY_IMAGES], extras)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "verify":
        print(verify_saved_model(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit("usage: python -m training.export verify SAVED_MODEL_DIR EXPECTED_NPZ")
