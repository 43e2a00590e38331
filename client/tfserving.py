"""A TensorFlow Serving gRPC client without TensorFlow: numpy in, numpy out.

`AsyncModelServerClient` shares one grpc.aio channel between all calls (the gateway holds one per worker);
`ModelServerClient` is its synchronous twin for scripts and the CLI. Both build requests and read responses
through the same functions below, so the two differ only in how they wait.

Every call has a deadline; a call that fails with UNAVAILABLE (server restarting, connection reset) is retried
once if the deadline leaves time. Message limits are raised to 64 MiB both ways: a batch of 64 images at
32x32x3 is only 196 KB, but encoded photos sent to `predict_encoded` can be megabytes each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from client import contract
from client.protos.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from client.protos.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from client.protos.tensorflow_serving.config import model_server_config_pb2

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRY_PAUSE = 0.05  # seconds before the single retry on UNAVAILABLE

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC's reconnect backoff grows to 120 s by default: a gateway would keep failing for minutes after the
    # model server came back. Cap it so recovery takes about a second. (Not min_reconnect_backoff_ms: it is
    # also the connect timeout, and a busy server must not be given up on after 100 ms.)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

# numpy dtype <-> TensorProto dtype, and the repeated field used when tensor_content is absent.
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
}
_NUMPY_TO_DT = {dtype: dt for dt, (dtype, _) in _DTYPES.items()}
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ModelServerError(Exception):
    """A failed call to the model server; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Prediction:
    version: int  # the version that answered
    probabilities: np.ndarray  # float32 [N, 10], columns in contract.CLASS_NAMES order


@dataclass
class VersionStatus:
    version: int
    state: str  # UNKNOWN, START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str  # "OK" or a tensorflow.error.Code name
    error_message: str


# ---- numpy <-> TensorProto ------------------------------------------------------------------------------


def make_tensor_proto(array: np.ndarray | Sequence[bytes]) -> tensor_pb2.TensorProto:
    """numpy (numeric or bytes/str objects) or a list of bytes -> TensorProto (tensor_content for numbers)."""
    if isinstance(array, (list, tuple)):
        array = np.array(array, dtype=object) if array else np.zeros((0,), dtype=object)
    array = np.asarray(array)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                   for d in array.shape])
    if array.dtype.kind in "OSU":
        values = [v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=values)
    dt = _NUMPY_TO_DT.get(array.dtype.newbyteorder("=") if array.dtype.byteorder == ">" else array.dtype)
    if dt is None:
        raise TypeError(f"unsupported dtype {array.dtype}")
    # TensorFlow reads tensor_content as little-endian host order.
    content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return tensor_pb2.TensorProto(dtype=dt, tensor_shape=shape, tensor_content=content)


def make_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy; strings come back as an object array of bytes."""
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    size = int(np.prod(shape)) if shape else 1
    if proto.dtype == types_pb2.DT_STRING:
        values = list(proto.string_val)
        out = np.empty(size, dtype=object)
        if values:
            out[:] = values if len(values) == size else [values[-1]] * size
        return out.reshape(shape)
    if proto.dtype not in _DTYPES:
        raise ModelServerError(grpc.StatusCode.INTERNAL,
                               f"unsupported tensor dtype {types_pb2.DataType.Name(proto.dtype)}")
    dtype, field = _DTYPES[proto.dtype]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    values = getattr(proto, field)
    if proto.dtype == types_pb2.DT_HALF:
        array = np.array(values, dtype=np.uint16).view(np.float16)
    else:
        array = np.array(values, dtype=dtype)
    if array.size != size:
        # TensorFlow's convention: a short list is padded with its last value.
        array = np.full(size, array[-1] if array.size else 0, dtype=dtype)
    return array.reshape(shape)


# ---- requests and responses, shared by both clients ------------------------------------------------------


def _model_spec(model_name: str, version: int | None, label: str | None, signature: str = "") -> model_pb2.ModelSpec:
    if version is not None and label is not None:
        raise ValueError("give a version or a label, not both")
    spec = model_pb2.ModelSpec(name=model_name, signature_name=signature)
    if version is not None:
        spec.version.value = int(version)
    elif label is not None:
        spec.version_label = label
    return spec


def pixels_request(model_name: str, images: np.ndarray, version: int | None = None,
                   label: str | None = None) -> predict_pb2.PredictRequest:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (contract.IMAGE_SIZE,) * 2 + (3,):
        raise ValueError(f"expected uint8 [N, 32, 32, 3], got {images.dtype} {list(images.shape)}")
    request = predict_pb2.PredictRequest(
        model_spec=_model_spec(model_name, version, label, contract.DEFAULT_SIGNATURE),
        output_filter=[contract.PROBABILITIES],
    )
    request.inputs[contract.PIXELS_INPUT].CopyFrom(make_tensor_proto(images))
    return request


def encoded_request(model_name: str, images: Sequence[bytes], version: int | None = None,
                    label: str | None = None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(
        model_spec=_model_spec(model_name, version, label, contract.IMAGES_SIGNATURE),
        output_filter=[contract.PROBABILITIES],
    )
    request.inputs[contract.BYTES_INPUT].CopyFrom(make_tensor_proto(list(images)))
    return request


def read_prediction(response: predict_pb2.PredictResponse, n: int) -> Prediction:
    if contract.PROBABILITIES not in response.outputs:
        raise ModelServerError(grpc.StatusCode.INTERNAL,
                               f"the response has no '{contract.PROBABILITIES}' output: {sorted(response.outputs)}")
    probabilities = make_ndarray(response.outputs[contract.PROBABILITIES]).astype(np.float32, copy=False)
    if probabilities.shape != (n, len(contract.CLASS_NAMES)):
        raise ModelServerError(grpc.StatusCode.INTERNAL,
                               f"expected probabilities [{n}, 10], got {list(probabilities.shape)}")
    return Prediction(version=int(response.model_spec.version.value), probabilities=probabilities)


def status_request(model_name: str, version: int | None,
                   label: str | None) -> get_model_status_pb2.GetModelStatusRequest:
    return get_model_status_pb2.GetModelStatusRequest(model_spec=_model_spec(model_name, version, label))


def read_status(response: get_model_status_pb2.GetModelStatusResponse) -> list[VersionStatus]:
    states = get_model_status_pb2.ModelVersionStatus.State
    out = []
    for s in response.model_version_status:
        code = _GRPC_CODES.get(s.status.error_code, grpc.StatusCode.UNKNOWN)
        out.append(VersionStatus(version=int(s.version), state=states.Name(s.state) if s.state in states.values()
                                 else str(s.state), error_code=code.name, error_message=s.status.error_message))
    return sorted(out, key=lambda v: v.version)


def metadata_request(model_name: str, version: int | None,
                     label: str | None) -> get_model_metadata_pb2.GetModelMetadataRequest:
    return get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=_model_spec(model_name, version, label), metadata_field=["signature_def"]
    )


def read_metadata(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    """The shape of TF Serving's REST metadata answer: {"model_spec": ..., "metadata": {"signature_def": ...}}."""
    metadata: dict[str, Any] = {}
    if "signature_def" in response.metadata:
        sig = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig)
        metadata["signature_def"] = json_format.MessageToDict(sig, preserving_proto_field_name=True)
    spec = json_format.MessageToDict(response.model_spec, preserving_proto_field_name=True)
    return {"model_spec": spec, "metadata": metadata}


def reload_request(config: model_server_config_pb2.ModelServerConfig) -> model_management_pb2.ReloadConfigRequest:
    return model_management_pb2.ReloadConfigRequest(config=config)


def check_reload(response: model_management_pb2.ReloadConfigResponse) -> None:
    if response.status.error_code != 0:
        code = _GRPC_CODES.get(response.status.error_code, grpc.StatusCode.UNKNOWN)
        raise ModelServerError(code, response.status.error_message)


def _error(exc: grpc.RpcError) -> ModelServerError:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return ModelServerError(code or grpc.StatusCode.UNKNOWN, details or "")


class _Base:
    def __init__(self, target: str, timeout: float, model_name: str) -> None:
        self.target = target
        self.timeout = timeout
        self.model_name = model_name

    def _retry_budget(self, deadline: float, exc: grpc.RpcError) -> float | None:
        """Seconds left for the single retry after UNAVAILABLE, or None when not retrying."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        left = deadline - time.monotonic() - RETRY_PAUSE
        return left if left > 0.01 else None


class AsyncModelServerClient(_Base):
    """asyncio client over one shared grpc.aio channel, created on first use in the running loop."""

    def __init__(self, target: str = "127.0.0.1:8500", *, timeout: float = 10.0,
                 model_name: str = contract.MODEL_NAME) -> None:
        super().__init__(target, timeout, model_name)
        self._channel: grpc.aio.Channel | None = None

    def _stubs(self) -> tuple[Any, Any]:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
            self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        return self._predict, self._models

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        predict, models = self._stubs()
        rpc = getattr(predict, method, None) or getattr(models, method)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        try:
            return await rpc(request, timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.aio.AioRpcError as exc:
            left = self._retry_budget(deadline, exc)
            if left is None:
                raise _error(exc) from None
        await asyncio.sleep(RETRY_PAUSE)
        try:
            return await rpc(request, timeout=left)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def predict_pixels(self, images: np.ndarray, *, version: int | None = None, label: str | None = None,
                             timeout: float | None = None) -> Prediction:
        """uint8 [N, 32, 32, 3] RGB through `serving_default`, as one batch."""
        request = pixels_request(self.model_name, images, version, label)
        return read_prediction(await self._call("Predict", request, timeout), len(images))

    async def predict_encoded(self, images: Sequence[bytes], *, version: int | None = None,
                              label: str | None = None, timeout: float | None = None) -> Prediction:
        """Encoded images (JPEG, PNG, GIF, BMP) through `predict_images`, as one batch."""
        request = encoded_request(self.model_name, images, version, label)
        return read_prediction(await self._call("Predict", request, timeout), len(images))

    async def model_status(self, *, version: int | None = None, label: str | None = None,
                           timeout: float | None = None) -> list[VersionStatus]:
        return read_status(await self._call("GetModelStatus", status_request(self.model_name, version, label),
                                            timeout))

    async def metadata(self, *, version: int | None = None, label: str | None = None,
                       timeout: float | None = None) -> dict:
        return read_metadata(await self._call("GetModelMetadata", metadata_request(self.model_name, version, label),
                                              timeout))

    async def reload_config(self, config: model_server_config_pb2.ModelServerConfig, *,
                            timeout: float | None = None) -> None:
        check_reload(await self._call("HandleReloadConfigRequest", reload_request(config), timeout))

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> AsyncModelServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ModelServerClient(_Base):
    """The synchronous twin of AsyncModelServerClient (same methods, same conversions)."""

    def __init__(self, target: str = "127.0.0.1:8500", *, timeout: float = 10.0,
                 model_name: str = contract.MODEL_NAME) -> None:
        super().__init__(target, timeout, model_name)
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        rpc = getattr(self._predict, method, None) or getattr(self._models, method)
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        try:
            return rpc(request, timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as exc:
            left = self._retry_budget(deadline, exc)
            if left is None:
                raise _error(exc) from None
        time.sleep(RETRY_PAUSE)
        try:
            return rpc(request, timeout=left)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def predict_pixels(self, images: np.ndarray, *, version: int | None = None, label: str | None = None,
                       timeout: float | None = None) -> Prediction:
        request = pixels_request(self.model_name, images, version, label)
        return read_prediction(self._call("Predict", request, timeout), len(images))

    def predict_encoded(self, images: Sequence[bytes], *, version: int | None = None, label: str | None = None,
                        timeout: float | None = None) -> Prediction:
        request = encoded_request(self.model_name, images, version, label)
        return read_prediction(self._call("Predict", request, timeout), len(images))

    def model_status(self, *, version: int | None = None, label: str | None = None,
                     timeout: float | None = None) -> list[VersionStatus]:
        return read_status(self._call("GetModelStatus", status_request(self.model_name, version, label), timeout))

    def metadata(self, *, version: int | None = None, label: str | None = None,
                 timeout: float | None = None) -> dict:
        return read_metadata(self._call("GetModelMetadata", metadata_request(self.model_name, version, label),
                                        timeout))

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig, *,
                      timeout: float | None = None) -> None:
        check_reload(self._call("HandleReloadConfigRequest", reload_request(config), timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
