"""TF Serving's REST API (http_rest_api_handler.cc) as a lean ASGI app served by uvicorn on the same loop."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import zlib
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf import json_format

from client.protos.tensorflow_serving.apis import get_model_metadata_pb2
from serving.modelserver.core import Core, check_output_filter, check_request_inputs
from serving.modelserver.errors import HTTP_STATUS, ServingError, from_exception, invalid
from serving.modelserver.grpc_api import classify_signature_error, metadata_response, status_response
from serving.modelserver.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE, PREDICT_METHOD, REGRESS_METHOD
from serving.modelserver.tensors import (
    columnar_to_inputs,
    instances_to_inputs,
    json_value_str,
    parse_json_body,
    tensors_to_json,
)

PREDICTION_RE = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)")
STATUS_RE = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?")
HANDLER_RE = re.compile(r"(?i)/v1/.*")
MAX_INT64 = 2**63 - 1
JSON_HEADERS = [(b"content-type", b"application/json")]


def error_body(message: str) -> bytes:
    return ('{ "error": ' + json.dumps(message, ensure_ascii=False) + " }").encode()


class RestApp:
    def __init__(self, core: Core, timeout_ms: int, metrics_path: str | None) -> None:
        self.core = core
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.metrics_path = metrics_path
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.in_flight += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        method = scope["method"]
        if self.metrics_path and scope["path"] == self.metrics_path:
            body = self.core.metrics.render().encode()
            await _respond(send, 200, body, [(b"content-type", b"text/plain")])
            return
        if not HANDLER_RE.fullmatch(path):
            await _respond(send, 404, b"<html><title>404 Not Found</title><body>Not Found</body></html>",
                           [(b"content-type", b"text/html")])
            return
        body = await _read_body(receive)
        try:
            encoding = dict(scope["headers"]).get(b"content-encoding", b"").lower()
            if encoding == b"gzip" and body:
                try:
                    body = gzip.decompress(body)
                except (OSError, EOFError, zlib.error):
                    raise invalid("Failed to decompress gzip request body") from None
            status, out = 200, await self._dispatch(method, path, body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes TF Serving's error JSON
            err = from_exception(exc)
            status, out = HTTP_STATUS.get(err.code, 500), error_body(err.message)
        await _respond(send, status, out, JSON_HEADERS)

    async def _dispatch(self, method: str, path: str, body: bytes) -> bytes:
        malformed = invalid(f"Malformed request: {method} {path}")
        if method == "POST":
            m = PREDICTION_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label = _model_info(m.group(1), m.group(2), m.group(3))
            verb = m.group(4)
            if verb == "predict":
                return await self._predict(name, version, label, body)
            if verb in ("classify", "regress"):
                return await self._classify(name, version, label, body, verb)
            raise malformed
        if method == "GET":
            m = STATUS_RE.fullmatch(path)
            if not m:
                raise malformed
            name, version, label = _model_info(m.group(1) or "", m.group(2), m.group(3))
            if not name:
                raise invalid("Missing model name in request.")
            if m.group(4) and m.group(4) == "metadata":
                handle = self.core.manager.acquire(name, version, label)
                handle.release()
                return _metadata_json(metadata_response(handle, name))
            resp = status_response(self.core, name, version, label)
            return json.dumps(json_format.MessageToDict(
                resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                indent=1).encode()
        raise malformed

    async def _predict(self, name: str, version: int | None, label: str | None, body: bytes) -> bytes:
        started = time.perf_counter()
        served = None
        try:
            doc = parse_json_body(body)
            signature_name = _signature_name(doc)
            handle = self.core.manager.acquire(name, version, label)
            try:
                served = handle.servable.version
                key = signature_name or DEFAULT_SIGNATURE
                sig = handle.servable.signature(key)
                if sig is None:
                    raise invalid(f"Serving signature name: \"{key}\" not found in signature def")
                if not sig.inputs:
                    raise invalid(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
                row = "instances" in doc
                if row:
                    if "inputs" in doc:
                        raise invalid(f"JSON Value: {json_value_str(doc)} Not formatted correctly expecting only "
                                      "one of 'inputs' or 'instances' keys to exist ")
                    if not isinstance(doc["instances"], list):
                        raise invalid(f"JSON Value: {json_value_str(doc)} Excepting 'instances' to be an "
                                      "list/array")
                    if not doc["instances"]:
                        raise invalid(f"JSON Value: {json_value_str(doc)} No values in 'instances' array")
                    inputs = instances_to_inputs(doc, doc["instances"], sig.input_dtypes)
                elif "inputs" in doc:
                    inputs = columnar_to_inputs(doc["inputs"], sig.input_dtypes)
                else:
                    raise invalid("Missing 'inputs' or 'instances' key")
                check_request_inputs(sig, list(inputs))
                outputs = check_output_filter(sig, [])
                run = self.core.run(handle, sig, inputs, outputs)
                try:
                    result = await asyncio.wait_for(run, self.timeout) if self.timeout else await run
                except TimeoutError:
                    raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            finally:
                handle.release()
            out = tensors_to_json(result, row).encode()
        except Exception as exc:
            err = from_exception(exc)
            self.core.record(name, served, "predict", "REST", err.code, started)
            raise err from None
        self.core.record(name, served, "predict", "REST", grpc.StatusCode.OK, started)
        return out

    async def _classify(self, name: str, version: int | None, label: str | None, body: bytes, verb: str) -> bytes:
        started = time.perf_counter()
        try:
            doc = parse_json_body(body)
            signature_name = _signature_name(doc)
            if "context" in doc and not isinstance(doc["context"], dict):
                raise invalid(f"Example must be JSON object but got JSON {_json_type(doc['context'])}")
            examples = doc.get("examples")
            if examples is None:
                raise invalid(f"JSON Value: {json_value_str(doc)} When method is classify, key 'examples' is "
                              "expected and was not found")
            if not isinstance(examples, list):
                raise invalid(f"JSON Value: {json_value_str(doc)} Expecting 'examples' value to be an list/array")
            if not examples:
                raise invalid(f"JSON Value: {json_value_str(doc)} 'examples' value is an empty array")
            for ex in examples:
                if not isinstance(ex, dict):
                    raise invalid(f"Example must be JSON object but got JSON {_json_type(ex)}")
            handle = self.core.manager.acquire(name, version, label)
            handle.release()
            raise classify_signature_error(handle, signature_name,
                                           CLASSIFY_METHOD if verb == "classify" else REGRESS_METHOD)
        except Exception as exc:
            err = from_exception(exc)
            self.core.record(name, None, verb, "REST", err.code, started)
            raise err from None


def _json_type(v: Any) -> str:
    from serving.modelserver.tensors import json_type
    return json_type(v)


def _model_info(name: str, version: str | None, label: str | None) -> tuple[str, int | None, str | None]:
    name = unquote(name)
    v = None
    if version:
        if int(version) > MAX_INT64:
            raise invalid(f"Failed to convert version: {version} to numeric.")
        v = int(version)
    return name, v, (unquote(label) if label else None)


def _metadata_json(resp: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
    spec = json_format.MessageToDict(resp.model_spec, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigmap)
    sigs = json_format.MessageToDict(sigmap, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return json.dumps({"model_spec": spec, "metadata": {"signature_def": sigs}}, indent=1).encode()


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["RestApp", "PREDICT_METHOD"]


def _signature_name(doc: dict) -> str:
    signature_name = doc.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid(f"JSON Value: {json_value_str(doc)} not formatted correctly. 'signature_name' key "
                      "must be a string value.")
    return signature_name
