"""serving/gateway/uploads.py on its own: request bodies in, (filename, bytes) out, or ApiError with a stable code.
(The same inputs through a running gateway are in test_gateway.py.)"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from serving.gateway.errors import ApiError
from serving.gateway.settings import Settings
from serving.gateway.uploads import check_content_type, decode_images, parse_body

SETTINGS = Settings(max_files=3, max_file_bytes=1000)
BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def png(color: tuple[int, int, int] = (10, 200, 30), size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def form(*parts: tuple[bytes, bytes]) -> bytes:
    """parts: (Content-Disposition value, content)."""
    out = b""
    for disposition, content in parts:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: ".encode() + disposition
                + b"\r\nContent-Type: image/png\r\n\r\n" + content + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


def code_of(call, *args) -> tuple[int, str]:
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value.status, info.value.code


def test_multipart_files_in_order_with_their_names_and_plain_fields_skipped():
    a, b = png((255, 0, 0)), png((0, 0, 255))
    body = form((b'form-data; name="note"', b"not a file"),
                (b'form-data; name="files"; filename="red.png"', a),
                (b"form-data; name=\"files\"; filename*=UTF-8''chat%C3%A9.png", b))
    assert parse_body(MULTIPART, body, None, SETTINGS) == [("red.png", a), ("chaté.png", b)]


def test_multipart_empty_file_input_is_ignored_and_no_file_is_an_error():
    body = form((b'form-data; name="files"; filename=""', b""), (b'form-data; name="files"; filename="x"', png()))
    assert [name for name, _ in parse_body(MULTIPART, body, None, SETTINGS)] == ["x"]
    only_empty = form((b'form-data; name="files"; filename=""', b""))
    assert code_of(parse_body, MULTIPART, only_empty, None, SETTINGS) == (400, "no_images")


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", form((b'form-data; name="files"; filename="a"', png()))),  # no boundary
    (MULTIPART, b"no boundary anywhere"),
    (MULTIPART, form((b'form-data; name="files"; filename="a"', png()))[:-30]),  # truncated
    (MULTIPART, f"--{BOUNDARY}\r\nContent-Disposition: form-data".encode()),  # headers never end
])
def test_malformed_multipart_is_400(content_type, body):
    assert code_of(parse_body, content_type, body, None, SETTINGS) == (400, "invalid_multipart")


def test_limits_files_and_bytes():
    four = form(*[(f'form-data; name="files"; filename="{i}"'.encode(), png()) for i in range(4)])
    assert code_of(parse_body, MULTIPART, four, None, SETTINGS) == (413, "too_many_files")
    big = form((b'form-data; name="files"; filename="big"', b"x" * 1001))
    status, code = code_of(parse_body, MULTIPART, big, None, SETTINGS)
    assert (status, code) == (413, "file_too_large")
    assert code_of(parse_body, "image/png", b"x" * 1001, "raw.png", SETTINGS) == (413, "file_too_large")
    many = json.dumps({"images": [base64.b64encode(png()).decode()] * 4}).encode()
    assert code_of(parse_body, "application/json", many, None, SETTINGS) == (413, "too_many_files")


def test_json_base64_variants():
    data = png()
    std = base64.b64encode(data).decode()
    urlsafe_unpadded = base64.urlsafe_b64encode(data).decode().rstrip("=")
    wrapped = "\n".join(std[i:i + 76] for i in range(0, len(std), 76))
    doc = {"images": [std, f"data:image/png;base64,{urlsafe_unpadded}", {"b64": wrapped, "filename": "w.png"}]}
    got = parse_body("application/json", json.dumps(doc).encode(), None, SETTINGS)
    assert got == [(None, data), (None, data), ("w.png", data)]
    single = parse_body("application/json; charset=utf-8", json.dumps({"images": std}).encode(), None, SETTINGS)
    assert single == [(None, data)]


@pytest.mark.parametrize("body, code", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b'{"images": 3}', "invalid_json"),
    (b'{"images": []}', "no_images"),
    (b'{"images": [17]}', "invalid_json"),
    (b'{"images": ["***not base64***"]}', "invalid_base64"),
    (b"\xff\xfe", "invalid_json"),
])
def test_bad_json_is_400_with_its_code(body, code):
    assert code_of(parse_body, "application/json", body, None, SETTINGS) == (400, code)


def test_raw_body_is_one_image_named_by_the_header():
    assert parse_body("image/png", b"abc", "cat.png", SETTINGS) == [("cat.png", b"abc")]
    assert parse_body("application/octet-stream", b"abc", None, SETTINGS) == [(None, b"abc")]


@pytest.mark.parametrize("content_type", ["", "text/plain", "application/x-www-form-urlencoded", "video/mp4"])
def test_unsupported_content_types_are_415(content_type):
    assert code_of(check_content_type, content_type) == (415, "unsupported_media_type")


def test_decode_images_batches_pixels_and_names_the_bad_file():
    batch = decode_images([("a", png((1, 2, 3))), ("b", png((4, 5, 6), size=64))], max_pixels=10_000)
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    assert tuple(batch[0, 0, 0]) == (1, 2, 3) and tuple(batch[1, 5, 5]) == (4, 5, 6)
    with pytest.raises(ApiError) as info:
        decode_images([("good.png", png()), ("bad.png", b"GIF89a not really")], max_pixels=10_000)
    assert info.value.status in (415, 422) and "bad.png" in info.value.message
    with pytest.raises(ApiError) as info:
        decode_images([("huge.png", png(size=200))], max_pixels=10_000)
    assert info.value.status == 413
