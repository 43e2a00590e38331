"""Reading images out of request bodies: multipart/form-data, JSON with base64, or one raw image.

Plain functions over bytes already in memory, so they are tested without a server; every malformed input
and every breached limit raises ApiError with a stable code (docs/gateway.md lists them).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from typing import Any

import numpy as np
from python_multipart.multipart import parse_options_header

from client import contract
from client.preprocessing import ImageError, preprocess
from serving.gateway import metrics
from serving.gateway.errors import ApiError, from_image_error
from serving.gateway.settings import Settings

Upload = tuple[str | None, bytes]  # (filename if the client gave one, encoded image)

_RAW_TYPES = ("image/", "application/octet-stream")
_ACCEPTED = "multipart/form-data, image/*, application/octet-stream or application/json"


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def check_content_type(content_type: str) -> None:
    """415 unless the Content-Type header names a body this service reads."""
    media = _media_type(content_type)
    if not media:
        raise ApiError(415, "unsupported_media_type", f"a Content-Type is required: {_ACCEPTED}")
    if media not in ("multipart/form-data", "application/json") and not media.startswith(_RAW_TYPES):
        raise ApiError(415, "unsupported_media_type", f"Content-Type {media} is not supported; use {_ACCEPTED}")


def parse_body(content_type: str, body: bytes, filename: str | None, settings: Settings) -> list[Upload]:
    """The images of a request body, by its Content-Type (a raw body is one image named by `filename`)."""
    check_content_type(content_type)
    media = _media_type(content_type)
    if media == "multipart/form-data":
        images = parse_multipart(content_type, body, settings)
    elif media == "application/json":
        images = parse_json(body, settings)
    else:
        check_size(body, filename or "the body", settings)
        images = [(filename, body)]
    if len(images) > settings.max_files:
        raise too_many(len(images), settings)
    return images


def check_size(data: bytes, name: str, settings: Settings) -> None:
    if len(data) > settings.max_file_bytes:
        raise ApiError(413, "file_too_large",
                       f"{name}: {len(data)} bytes, more than the limit of {settings.max_file_bytes} per image")


def too_many(n: int, settings: Settings) -> ApiError:
    return ApiError(413, "too_many_files", f"{n} images in one request, more than the limit of {settings.max_files}")


_FILENAME_STAR = re.compile(rb"filename\*\s*=\s*([\w!#$&+.^`|~-]+)'[\w-]*'([^;\s]+)", re.IGNORECASE)


def parse_multipart(content_type: str, body: bytes, settings: Settings) -> list[Upload]:
    """multipart/form-data (RFC 7578) parsed from the buffered body: every part with a filename is an image.

    A direct split of bytes already in memory: several times cheaper per request than a streaming parser that
    spools each file to a temporary file, which matters for the many small uploads this service gets.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ApiError(400, "invalid_multipart", "the multipart Content-Type has no valid boundary")
    dash = b"--" + boundary
    pos = body.find(dash)
    if pos < 0:
        raise ApiError(400, "invalid_multipart", "the multipart body does not contain its boundary")
    images: list[Upload] = []
    parts = 0
    pos += len(dash)
    while not body.startswith(b"--", pos):
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise ApiError(400, "invalid_multipart", "the multipart body ends before its closing boundary")
        start = eol + 2
        if body.startswith(b"\r\n", start):
            header_block, content_start = b"", start + 2
        else:
            end = body.find(b"\r\n\r\n", start)
            if end < 0:
                raise ApiError(400, "invalid_multipart", "a multipart part has no end of headers")
            header_block, content_start = body[start:end], end + 4
        next_delimiter = body.find(b"\r\n" + dash, content_start)
        if next_delimiter < 0:
            raise ApiError(400, "invalid_multipart", "the multipart body ends before its closing boundary")
        content = body[content_start:next_delimiter]
        pos = next_delimiter + 2 + len(dash)
        parts += 1
        if parts > settings.max_files + 100:
            raise ApiError(400, "invalid_multipart", "too many parts in the multipart body")
        disposition = b""
        for line in header_block.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-disposition":
                disposition = value.strip()
        _, options = parse_options_header(disposition)
        star = _FILENAME_STAR.search(disposition)
        if star:
            try:
                filename: str | None = urllib.parse.unquote_to_bytes(star.group(2)).decode(star.group(1).decode())
            except (LookupError, UnicodeDecodeError):
                filename = None
        elif b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
        else:
            continue  # a plain form field, not a file
        if not filename and not content:
            continue  # what a browser sends for an empty file input
        if len(images) >= settings.max_files:
            raise too_many(len(images) + 1, settings)
        check_size(content, filename or f"file {len(images) + 1}", settings)
        images.append((filename or None, content))
    if not images:
        raise ApiError(400, "no_images", "the multipart body has no file part (send images in the field 'files')")
    return images


def decode_base64(text: Any, index: int) -> bytes:
    if not isinstance(text, str):
        raise ApiError(400, "invalid_json", f"images[{index}] must be a base64 string or {{\"b64\": ...}}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    # Tolerate line breaks (MIME base64), missing padding and the URL-safe alphabet; refuse anything else.
    cleaned = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"images[{index}] is not valid base64") from None


def parse_json(body: bytes, settings: Settings) -> list[Upload]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or "images" not in doc:
        raise ApiError(400, "invalid_json", 'the JSON body must be an object {"images": ["<base64>", ...]}')
    items = doc["images"]
    if isinstance(items, (str, dict)):
        items = [items]
    if not isinstance(items, list):
        raise ApiError(400, "invalid_json", '"images" must be a list of base64 strings')
    if not items:
        raise ApiError(400, "no_images", '"images" is empty')
    if len(items) > settings.max_files:
        raise too_many(len(items), settings)
    images = []
    for i, item in enumerate(items):
        name = None
        if isinstance(item, dict):
            name = item.get("filename") if isinstance(item.get("filename"), str) else None
            item = item.get("b64", item.get("data"))
        data = decode_base64(item, i)
        check_size(data, name or f"images[{i}]", settings)
        images.append((name, data))
    return images


def decode_images(images: list[Upload], max_pixels: int) -> np.ndarray:
    out = np.empty((len(images), contract.IMAGE_SIZE, contract.IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (name, data) in enumerate(images):
        try:
            out[i] = preprocess(data, max_pixels=max_pixels)
        except ImageError as exc:
            metrics.IMAGE_ERRORS.labels(exc.code).inc()
            label = name or (f"image {i + 1}" if len(images) > 1 else None)
            raise from_image_error(exc, label) from None
    return out
