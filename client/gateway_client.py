"""HTTP clients for the gateway's `/v1` API (sync and async, over httpx).

```python
from client.gateway_client import GatewayClient
with GatewayClient("http://127.0.0.1:8000") as gw:
    result = gw.classify(["cat.png", "ship.jpg"], top_k=3, label="stable")
    print(result.version, result.predictions[0].top[0].class_name)
```

Images may be paths, encoded bytes or PIL images (sent as PNG); they go up as one multipart request. A non-2xx
answer raises `GatewayError` with the gateway's stable error code; a request that got no HTTP answer at all
(refused connection, timeout) raises `GatewayError` with status 0 and code `unavailable` or `timeout`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"

try:  # Pillow is a base dependency, but keep the client importable without it for bytes and paths.
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, "_PILImage.Image"]


class GatewayError(Exception):
    """An error answer of the gateway: HTTP status (0 when there was no answer), stable code, human message."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class ClassScore:
    class_name: str
    class_id: int
    probability: float


@dataclass(frozen=True)
class ImagePrediction:
    filename: str | None
    top: list[ClassScore]
    probabilities: dict[str, float] | None = None  # all ten, only when asked for

    @property
    def best(self) -> ClassScore:
        return self.top[0]


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: int
    predictions: list[ImagePrediction]
    request_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class ModelVersion:
    version: int
    state: str
    labels: list[str]


@dataclass(frozen=True)
class ModelsInfo:
    model: str
    versions: list[ModelVersion]

    def label_target(self, label: str) -> int | None:
        return next((v.version for v in self.versions if label in v.labels), None)


# ---- request building and answer parsing, shared by both clients -------------------------------------------


def _encode(image: ImageInput, index: int) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of one image input."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image{index}", bytes(image), "application/octet-stream"
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return f"image{index}.png", buffer.getvalue(), "image/png"
    raise TypeError(f"unsupported image input {type(image).__name__}: give a path, bytes or a PIL image")


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [images]
    if _PILImage is not None and isinstance(images, _PILImage.Image):
        return [images]
    return list(images)


def _classify_request(
    images: ImageInput | Sequence[ImageInput],
    top_k: int,
    version: int | None,
    label: str | None,
    all_probabilities: bool,
) -> tuple[dict[str, str], list[tuple[str, tuple[str, bytes, str]]]]:
    if version is not None and label is not None:
        raise ValueError("give a version or a label, not both")
    items = _as_list(images)
    if not items:
        raise ValueError("no images to classify")
    params = {"top_k": str(top_k), "all_probabilities": "true" if all_probabilities else "false"}
    if version is not None:
        params["version"] = str(version)
    if label is not None:
        params["label"] = label
    return params, [("files", _encode(image, i)) for i, image in enumerate(items)]


def _error_from(response: httpx.Response) -> GatewayError:
    try:
        body = response.json()
        error = body["error"]
        return GatewayError(response.status_code, str(error["code"]), str(error["message"]), body.get("request_id"))
    except (ValueError, KeyError, TypeError):
        # Not the gateway's error JSON (a proxy in between, a crash page): keep what there is.
        text = response.text.strip()[:500] or response.reason_phrase
        return GatewayError(response.status_code, f"http_{response.status_code}", text)


def _checked_json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _error_from(response)
    try:
        return response.json()
    except ValueError as exc:
        raise GatewayError(response.status_code, "invalid_response", f"the gateway answered non-JSON: {exc}") from exc


def parse_classify(body: dict[str, Any]) -> ClassifyResult:
    """The typed form of a `/v1/classify` answer."""
    predictions = [
        ImagePrediction(
            filename=p.get("filename"),
            top=[ClassScore(t["class"], int(t["class_id"]), float(t["probability"])) for t in p["top"]],
            probabilities={k: float(v) for k, v in p["probabilities"].items()} if p.get("probabilities") else None,
        )
        for p in body["predictions"]
    ]
    return ClassifyResult(body["model"], int(body["version"]), predictions, body.get("request_id"), raw=body)


def parse_models(body: dict[str, Any]) -> ModelsInfo:
    versions = [
        ModelVersion(int(v["version"]), str(v.get("state", "UNKNOWN")), list(v.get("labels", [])))
        for v in body.get("versions", [])
    ]
    return ModelsInfo(body.get("model", ""), versions)


def _transport_error(exc: httpx.TransportError, url: str) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return GatewayError(0, "timeout", f"no answer from {url} in time ({exc.__class__.__name__})")
    return GatewayError(0, "unavailable", f"cannot reach the gateway at {url}: {exc}")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


# ---- clients -------------------------------------------------------------------------------------------------


class GatewayClient:
    """Synchronous client; one connection pool, close it (or use `with`)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=_headers(api_key), transport=transport
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from exc

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 3,
        version: int | None = None,
        label: str | None = None,
        all_probabilities: bool = False,
    ) -> ClassifyResult:
        params, files = _classify_request(images, top_k, version, label, all_probabilities)
        return parse_classify(_checked_json(self._send("POST", "/v1/classify", params=params, files=files)))

    def models(self) -> ModelsInfo:
        return parse_models(_checked_json(self._send("GET", "/v1/models")))

    def healthy(self) -> bool:
        return self._send("GET", "/healthz").status_code == 200

    def ready(self) -> bool:
        return self._send("GET", "/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGatewayClient:
    """Asynchronous twin of `GatewayClient` (one shared httpx.AsyncClient; safe for concurrent tasks)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 30.0,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers=_headers(api_key),
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.base_url) from exc

    async def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 3,
        version: int | None = None,
        label: str | None = None,
        all_probabilities: bool = False,
    ) -> ClassifyResult:
        params, files = _classify_request(images, top_k, version, label, all_probabilities)
        response = await self._send("POST", "/v1/classify", params=params, files=files)
        return parse_classify(_checked_json(response))

    async def models(self) -> ModelsInfo:
        return parse_models(_checked_json(await self._send("GET", "/v1/models")))

    async def healthy(self) -> bool:
        return (await self._send("GET", "/healthz")).status_code == 200

    async def ready(self) -> bool:
        return (await self._send("GET", "/readyz")).status_code == 200

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "AsyncGatewayClient",
    "ClassScore",
    "ClassifyResult",
    "GatewayClient",
    "GatewayError",
    "ImagePrediction",
    "ModelVersion",
    "ModelsInfo",
    "parse_classify",
    "parse_models",
]
