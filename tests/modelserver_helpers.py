"""Starting the embedded model server as a real process, and small gRPC/REST helpers for its tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np

from client.protos.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from client.protos.tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tests.conftest import ROOT, free_port


@dataclass
class ModelServer:
    proc: subprocess.Popen
    grpc_port: int
    rest_port: int
    log_path: Path
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, name: str = "cifar10") -> dict[int, tuple[str, str, str]]:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        resp = self.model_stub.GetModelStatus(req, timeout=10)
        return {
            s.version: (get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                        grpc.StatusCode(_code(s.status.error_code)).name, s.status.error_message)
            for s in resp.model_version_status
        }

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition"):  # noqa: ANN001, ANN201
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last={last!r}\n--- server log ---\n{self.log()[-4000:]}")

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def _code(number: int) -> tuple:
    for c in grpc.StatusCode:
        if c.value[0] == number:
            return c.value
    return grpc.StatusCode.UNKNOWN.value


def start_server(workdir: Path, *flags: str, model_base: Path | None = None, wait_available: bool = True,
                 timeout: float = 120.0, env: dict[str, str] | None = None) -> ModelServer:
    """Runs `python -m serving.modelserver` on free 127.0.0.1 ports; waits until a version is AVAILABLE."""
    grpc_port, rest_port = free_port(), free_port()
    args = [sys.executable, "-m", "serving.modelserver", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
            "--bind_address=127.0.0.1"]
    if model_base is not None:
        args += ["--model_name=cifar10", f"--model_base_path={model_base}"]
    args += list(flags)
    log_path = workdir / f"modelserver-{grpc_port}.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ModelServer(proc, grpc_port, rest_port, log_path)
    if not wait_available:
        return server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"model server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            r = httpx.get(f"{server.rest}/v1/models/cifar10", timeout=2)
            if r.status_code == 200 and '"AVAILABLE"' in r.text:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"model server did not become ready:\n{server.log()[-4000:]}")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def tensor(arr: np.ndarray) -> tensor_pb2.TensorProto:
    tp = tensor_pb2.TensorProto()
    if arr.dtype == object:
        tp.dtype = types_pb2.DT_STRING
        tp.string_val.extend(arr.reshape(-1).tolist())
    else:
        tp.dtype = {np.dtype(np.uint8): types_pb2.DT_UINT8, np.dtype(np.float32): types_pb2.DT_FLOAT}[arr.dtype]
        tp.tensor_content = arr.tobytes()
    tp.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in arr.shape)
    return tp


def predict_request(images: np.ndarray, *, version: int | None = None, label: str | None = None,
                    signature: str = "", key: str = "images", name: str = "cifar10") -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if signature:
        req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    req.inputs[key].CopyFrom(tensor(images))
    return req


def probabilities(resp: predict_pb2.PredictResponse) -> np.ndarray:
    t = resp.outputs["probabilities"]
    return np.array(t.float_val, dtype=np.float32).reshape([d.size for d in t.tensor_shape.dim])


def png_bytes(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()
