"""One loaded model version: the SavedModel, its signature defs, the checks before a call, and warm-up.

TensorFlow is imported here (lazily) and nowhere on the request path's event loop: `Servable.run` is called
from batching or worker threads only.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from client.protos.tensorflow.core.protobuf import meta_graph_pb2
from client.protos.tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from serving.modelserver.errors import ServingError, invalid
from serving.modelserver.tensors import NUMPY_DTYPE, dtype_name, proto_to_numpy

log = logging.getLogger("modelserver")

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
_TABLE_MAGIC = 0xDB4775248B80FB57  # footer of a complete TF checkpoint index (leveldb table)
_SHARD = re.compile(r"^variables\.data-(\d+)-of-(\d+)$")


# --- is a version folder complete? ------------------------------------------------------------------------

def folder_fingerprint(path: Path) -> tuple | None:
    """Names, sizes and mtimes of every file below `path`: a writer still at work changes it between polls."""
    entries = []
    try:
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                entries.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return tuple(entries)


def incomplete_reason(path: Path) -> str | None:
    """Why `path` does not yet look like a whole SavedModel (None when it does).

    Checks what a copy or export in progress leaves unfinished: saved_model.pb must parse, the variables
    index must end with its table footer and be readable, every data shard it names must exist and hold at
    least the bytes of the numeric tensors it lists.
    """
    pb = path / "saved_model.pb"
    if not pb.is_file() and not (path / "saved_model.pbtxt").is_file():
        return "no saved_model.pb"
    index = path / "variables" / "variables.index"
    try:
        with open(index, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() < 48:
                return "variables.index is truncated"
            fh.seek(-8, os.SEEK_END)
            if struct.unpack("<Q", fh.read(8))[0] != _TABLE_MAGIC:
                return "variables.index is incomplete"
    except OSError:
        return "no variables/variables.index"
    shards = {}
    for p in (path / "variables").iterdir():
        m = _SHARD.match(p.name)
        if m:
            shards[int(m.group(1))] = (int(m.group(2)), p.stat().st_size)
    total = next(iter(shards.values()))[0] if shards else 1
    if sorted(shards) != list(range(total)):
        return "variables data shards missing"
    try:
        from tensorflow.core.protobuf import saved_model_pb2

        if pb.is_file():
            saved_model_pb2.SavedModel.FromString(pb.read_bytes())
        import tensorflow as tf

        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except Exception:  # noqa: BLE001 - unreadable now; a finished but broken folder fails at load instead
        return "saved_model.pb or the variables index does not parse yet"
    numeric = sum(
        int(np.prod(shape)) * dtypes[name].size for name, shape in shapes.items()
        if dtypes[name] != tf.string and dtypes[name].size)
    if sum(size for _, size in shards.values()) < numeric:
        return "variables data is shorter than the tensors its index lists"
    return None


# --- signatures ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    dtype: int
    shape: tuple[int, ...] | None  # None: unknown rank; -1: unknown dimension


@dataclass(frozen=True)
class Signature:
    name: str
    method_name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @property
    def input_dtypes(self) -> dict[str, int]:
        return {k: v.dtype for k, v in self.inputs.items()}


def _spec(info: meta_graph_pb2.TensorInfo) -> TensorSpec:
    shape = None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim)
    return TensorSpec(info.dtype, shape)


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The serving MetaGraph's SignatureDefs, as the vendored (TF-free) proto type."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    pb = path / "saved_model.pb"
    if pb.is_file():
        sm.ParseFromString(pb.read_bytes())
    else:
        from google.protobuf import text_format
        text_format.Parse((path / "saved_model.pbtxt").read_text(), sm)
    graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags] or list(sm.meta_graphs)
    if not graphs:
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find meta graph def matching supplied tags: "
                                                      f"{{ serve }}. in SavedModel at {path}")
    out = {}
    for key, sig in graphs[0].signature_def.items():
        out[key] = meta_graph_pb2.SignatureDef.FromString(sig.SerializeToString())
    return out


def _shape_str(shape: tuple[int, ...] | None) -> str:
    return "[?]" if shape is None else "[" + ",".join(str(s) for s in shape) + "]"


# --- the servable ---------------------------------------------------------------------------------------------

class Servable:
    """A loaded SavedModel version. `run` is thread-safe (TF concrete functions are)."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path)
        self.signatures = {
            key: Signature(key, sd.method_name, {k: _spec(v) for k, v in sd.inputs.items()},
                           {k: _spec(v) for k, v in sd.outputs.items()})
            for key, sd in self.signature_defs.items()
        }
        self._loaded = tf.saved_model.load(str(path), tags=["serve"])
        self._fns = dict(self._loaded.signatures)
        self._tf = tf

    def signature(self, name: str) -> Signature | None:
        return self.signatures.get(name or DEFAULT_SIGNATURE)

    def check_inputs(self, sig: Signature, inputs: dict[str, np.ndarray]) -> int:
        """Dtype and shape against the SignatureDef (a wrong rank would crash TF's kernels); returns the batch."""
        batch = -1
        for i, alias in enumerate(sorted(sig.inputs)):
            spec, arr = sig.inputs[alias], inputs[alias]
            want = NUMPY_DTYPE.get(spec.dtype)
            if want is None or arr.dtype != want:
                got = "string" if arr.dtype == object else dtype_name(_enum_of(arr.dtype))
                raise invalid(f"Expects arg[{i}] to be {dtype_name(spec.dtype)} but {got} is provided")
            if spec.shape is not None:
                ok = len(arr.shape) == len(spec.shape) and all(
                    s < 0 or s == a for s, a in zip(spec.shape, arr.shape, strict=True))
                if not ok:
                    raise invalid(f"Incompatible shapes: input tensor {alias} has shape {_shape_str(arr.shape)} "
                                  f"but the signature expects {_shape_str(spec.shape)}")
            if arr.ndim:
                if batch >= 0 and arr.shape[0] != batch:
                    raise invalid(f"Batched input tensors must have equal 0th-dimension size; {alias} has "
                                  f"{arr.shape[0]}, expected {batch}")
                batch = arr.shape[0]
        return batch

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = self.signatures[signature]
        first = next(iter(inputs.values()), None)
        if first is not None and first.ndim and first.shape[0] == 0:
            # An empty batch never reaches the kernels: answer empty outputs of the declared shapes.
            return {k: np.zeros(tuple(0 if s < 0 else s for s in (v.shape or (0,))), NUMPY_DTYPE[v.dtype])
                    for k, v in sig.outputs.items()}
        fn = self._fns.get(signature)
        if fn is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"Serving signature key \"{signature}\" not found.")
        tf = self._tf
        try:
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except tf.errors.OpError as exc:
            from serving.modelserver.errors import from_exception
            raise from_exception(exc) from None
        except (TypeError, ValueError) as exc:
            raise invalid(str(exc)) from None
        return {k: v.numpy() for k, v in out.items()}

    def warm_up(self, iterations: int = 1) -> int:
        """Replays assets.extra/tf_serving_warmup_requests (PredictionLog records) through the model."""
        path = self.path / WARMUP_PATH
        if not path.is_file():
            return 0
        import tensorflow as tf

        count = 0
        for raw in tf.data.TFRecordDataset(str(path)).take(MAX_WARMUP_RECORDS + 1):
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise invalid(f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
            entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise invalid(f"Unsupported log_type for warmup: {kind}")
            for _ in range(max(1, iterations)):
                self.predict_direct(entry.predict_log.request)
        return count

    def predict_direct(self, request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        sig = self.signatures.get(name)
        if sig is None:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f"Serving signature key \"{name}\" not found.")
        from serving.modelserver.core import check_output_filter, check_request_inputs

        check_request_inputs(sig, list(request.inputs))
        inputs = {k: proto_to_numpy(v, k) for k, v in request.inputs.items()}
        outputs = check_output_filter(sig, list(request.output_filter))
        self.check_inputs(sig, inputs)
        result = self.run(name, inputs)
        return {k: result[k] for k in outputs}


def _enum_of(dtype: np.dtype) -> int:
    from serving.modelserver.tensors import DTYPE_ENUM
    return DTYPE_ENUM.get(dtype, -1)


def load(name: str, version: int, path: Path, warmup: bool, warmup_iterations: int = 1) -> Servable:
    start = time.monotonic()
    servable = Servable(name, version, path)
    records = servable.warm_up(warmup_iterations) if warmup else 0
    log.info("Loaded servable version {name: %s version: %d} in %.2f s (%d warm-up records)",
             name, version, time.monotonic() - start, records)
    return servable
