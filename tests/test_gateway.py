"""The gateway against a real model server (two versions, labels stable/canary): classify in all three upload
forms, model selection, /v1/models, health, metrics, docs, request ids, limits and every malformed input."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from test_gateway_servers import Gateway, cifar_images, png_bytes, start_labelled_server

from client import contract
from client.tfserving import ModelServerClient

LIMITS = {
    "GATEWAY_MAX_FILE_BYTES": "300000",
    "GATEWAY_MAX_REQUEST_BYTES": "2000000",
    "GATEWAY_MAX_FILES": "8",
    "GATEWAY_MAX_PIXELS": "4000000",
    "GATEWAY_REQUEST_TIMEOUT": "3",
}


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, exported_model):
    server = start_labelled_server(tmp_path_factory.mktemp("gw-models"), exported_model)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(model_server, tmp_path_factory):
    gw = Gateway({"GATEWAY_MODEL_SERVER": model_server.target, **LIMITS})
    gw.start(tmp_path_factory.mktemp("gw-logs"))
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def images(cifar_archive):
    return cifar_images(cifar_archive, 16)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# ---- classify ---------------------------------------------------------------------------------------------


def test_multipart_many_images_match_the_model_server(http, model_server, images):
    pixels, _ = images
    files = [("files", (f"img{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(pixels[:5])]
    r = http.post("/v1/classify", files=files, params={"top_k": 3, "all_probabilities": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cifar10" and body["version"] == 2  # the latest answers by default
    assert body["request_id"] == r.headers["x-request-id"]
    assert [p["filename"] for p in body["predictions"]] == [f"img{i}.png" for i in range(5)]
    with ModelServerClient(model_server.target) as direct:
        want = direct.predict_pixels(pixels[:5], version=2).probabilities
    for pred, row in zip(body["predictions"], want, strict=True):
        assert len(pred["top"]) == 3
        top = pred["top"][0]
        assert top["class"] == contract.CLASS_NAMES[top["class_id"]] and top["class_id"] == int(row.argmax())
        probs = [pred["probabilities"][n] for n in contract.CLASS_NAMES]
        np.testing.assert_allclose(probs, row, atol=1e-6)
        assert [t["probability"] for t in pred["top"]] == sorted(probs, reverse=True)[:3]
        assert abs(sum(probs) - 1) < 1e-4


def test_raw_body_and_json_base64_give_the_same_answer(http, images):
    data = png_bytes(images[0][3])
    raw = http.post("/v1/classify", content=data, headers={"content-type": "image/png", "x-filename": "cat.png"})
    octet = http.post("/v1/classify?top_k=10", content=data, headers={"content-type": "application/octet-stream"})
    js = http.post("/v1/classify?top_k=10", json={"images": [base64.b64encode(data).decode(),
                                                              {"b64": base64.b64encode(data).decode(),
                                                               "filename": "x.png"}]})
    for r in (raw, octet, js):
        assert r.status_code == 200, r.text
    assert raw.json()["predictions"][0]["filename"] == "cat.png"
    assert len(raw.json()["predictions"][0]["top"]) == 3  # the default top_k
    assert "probabilities" not in raw.json()["predictions"][0]
    a, b, c = (octet.json()["predictions"][0]["top"], js.json()["predictions"][0]["top"],
               js.json()["predictions"][1]["top"])
    assert a == b == c and len(a) == 10
    assert js.json()["predictions"][1]["filename"] == "x.png"


def test_version_and_label_selection(http, images):
    data = png_bytes(images[0][0])
    for params, version in (({"version": 1}, 1), ({"version": 2}, 2), ({"label": "stable"}, 1),
                            ({"label": "canary"}, 2), ({}, 2)):
        r = http.post("/v1/classify", params=params, content=data, headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.json()["version"] == version, (params, r.text)
    assert_error(http.post("/v1/classify", params={"version": 7}, content=data,
                           headers={"content-type": "image/png"}), 404, "version_not_found")
    assert_error(http.post("/v1/classify", params={"label": "gold"}, content=data,
                           headers={"content-type": "image/png"}), 404, "label_not_found")
    assert_error(http.post("/v1/classify", params={"label": "stable", "version": 1}, content=data,
                           headers={"content-type": "image/png"}), 400, "version_and_label")


def test_photos_of_many_sizes_formats_and_modes(http, images):
    photo = Image.fromarray(images[0][5]).resize((640, 480), Image.Resampling.BICUBIC)
    small = photo.resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    grey16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files = [
        ("files", ("a.jpg", encode(photo, "JPEG", quality=85, exif=exif), "image/jpeg")),
        ("files", ("b.webp", encode(photo.resize((97, 131)), "WEBP"), "image/webp")),
        ("files", ("c.gif", encode(small.convert("P"), "GIF", save_all=True, append_images=[small.convert("P")]),
                   "image/gif")),
        ("files", ("d.png", encode(small.convert("RGBA"), "PNG"), "image/png")),
        ("files", ("e.tif", encode(small.convert("CMYK"), "TIFF"), "image/tiff")),
        ("files", ("f.png", encode(Image.fromarray(grey16), "PNG"), "image/png")),
        ("files", ("g.bmp", encode(small.convert("L").resize((3, 500)), "BMP"), "image/bmp")),
        ("files", ("h.ico", encode(small, "ICO"), "image/x-icon")),
    ]
    r = http.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 8


# ---- models, health, metrics, docs ------------------------------------------------------------------------


def test_models_lists_versions_states_and_labels(http):
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cifar10" and body["default_version"] == 2
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version[1]["state"] == by_version[2]["state"] == "AVAILABLE"
    assert by_version[1]["labels"] == ["stable"] and by_version[2]["labels"] == ["canary"]


def test_health_readiness_docs_and_page(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["available_versions"] == [1, 2]
    spec = http.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert http.get("/docs").status_code == 200
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<script>" in page.text


def test_metrics_per_route_status_and_version(http, images):
    data = png_bytes(images[0][1])
    for _ in range(3):
        assert http.post("/v1/classify?label=stable", content=data, headers={"content-type": "image/png"}).is_success
    http.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"})
    text = http.get("/metrics").text
    assert 'gateway_requests_total{method="POST",model_version="1",route="/v1/classify",status="200"}' in text
    assert 'route="/v1/classify",status="415"' in text
    assert 'gateway_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/classify"}' in text
    assert 'gateway_images_classified_total{model_version="1"}' in text
    assert 'gateway_predicted_class_total{class_name=' in text
    assert 'gateway_top1_confidence_bucket{le="1.0",model_version="1"}' in text
    assert 'gateway_image_errors_total{code="not_an_image"}' in text


def test_request_id_in_and_out(http):
    r = http.get("/healthz", headers={"X-Request-ID": "abc-123.x"})
    assert r.headers["x-request-id"] == "abc-123.x"
    r = http.post("/v1/classify", content=b"", headers={"content-type": "image/png", "X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["request_id"] == "trace-42"
    r = http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert len(r.headers["x-request-id"]) == 32  # replaced by a fresh one


def test_json_logs_carry_the_request_id(http, gateway):
    http.get("/healthz", headers={"X-Request-ID": "log-probe-1"})
    time.sleep(0.2)
    lines = [json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("request_id") == "log-probe-1"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/healthz"
    assert "duration_ms" in access[-1]


# ---- malformed input and limits ---------------------------------------------------------------------------


def png_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_malformed_inputs_get_the_right_4xx(http, images):
    png = png_bytes(images[0][0])
    jpeg = encode(Image.fromarray(images[0][0]).resize((256, 256)), "JPEG")
    raw = {"content-type": "image/png"}
    cases = [
        (http.post("/v1/classify", content=b"", headers=raw), 400, "empty_image"),
        (http.post("/v1/classify", content=b"%PDF-1.4 not an image" * 20, headers=raw), 415, "not_an_image"),
        (http.post("/v1/classify", content=jpeg[: len(jpeg) // 2], headers=raw), 422, "truncated_image"),
        (http.post("/v1/classify", content=png_with_size(0, 7), headers=raw), 422, "zero_size_image"),
        (http.post("/v1/classify", content=png_with_size(50_000, 50_000), headers=raw), 413, "image_too_large"),
        (http.post("/v1/classify", content=png, headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type"),
        (http.post("/v1/classify", content=png, headers={"content-type": ""}), 415, "unsupported_media_type"),
        (http.post("/v1/classify", json={"images": ["***not base64***"]}), 400, "invalid_base64"),
        (http.post("/v1/classify", json={"pictures": []}), 400, "invalid_json"),
        (http.post("/v1/classify", json={"images": []}), 400, "no_images"),
        (http.post("/v1/classify", json={"images": [12]}), 400, "invalid_json"),
        (http.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 400,
         "invalid_json"),
        (http.post("/v1/classify", data={"note": "no file"}, files={"x": ("", b"")}), 400, "no_images"),
        (http.post("/v1/classify", content=b"--xx\r\ngarbage", headers={"content-type": "multipart/form-data"}),
         400, "invalid_multipart"),
        (http.post("/v1/classify?top_k=0", content=png, headers=raw), 422, "invalid_parameter"),
        (http.post("/v1/classify?top_k=abc", content=png, headers=raw), 422, "invalid_parameter"),
        (http.post("/v1/classify?version=-1", content=png, headers=raw), 422, "invalid_parameter"),
        (http.get("/v1/classify"), 405, "method_not_allowed"),
        (http.get("/nope"), 404, "not_found"),
    ]
    for response, status, code in cases:
        assert_error(response, status, code)
    # Multipart with only a text field.
    r = http.post("/v1/classify", data={"note": "hello"}, files={"dummy": ("a.txt", b"x", "text/plain")})
    assert r.status_code in (415, 422)  # the part is a file, but not an image
    r = http.post("/v1/classify", content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n--b--\r\n",
                  headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 400, "no_images")


def test_limits_bytes_files_and_pixels(http, images):
    png = png_bytes(images[0][0])
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)), "PNG")
    assert len(big) > 300_000
    assert_error(http.post("/v1/classify", content=big, headers={"content-type": "image/png"}), 413, "file_too_large")
    assert_error(http.post("/v1/classify", files=[("files", ("a.png", big, "image/png"))]), 413, "file_too_large")
    body = assert_error(http.post("/v1/classify", files=[("files", (f"{i}.png", png, "image/png"))
                                                          for i in range(9)]), 413, "too_many_files")
    assert "8" in body["error"]["message"]
    assert_error(http.post("/v1/classify", json={"images": [base64.b64encode(png).decode()] * 9}), 413,
                 "too_many_files")
    assert_error(http.post("/v1/classify", content=b"\0" * 2_100_000, headers={"content-type": "image/png"}), 413,
                 "request_too_large")
    wide = encode(Image.new("L", (2100, 2000)), "PNG")  # 4.2 MP > 4 MP limit, small file
    body = assert_error(http.post("/v1/classify", files=[("files", ("ok.png", png, "image/png")),
                                                         ("files", ("wide.png", wide, "image/png"))]),
                        413, "image_too_large")
    assert "wide.png" in body["error"]["message"]


def test_slow_upload_times_out_with_408(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port)) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n"
                  b"\r\n" + b"\x89PNG")
        s.settimeout(10)
        t0 = time.monotonic()
        reply = s.recv(4096).decode(errors="replace")
        while '"request_id"' not in reply and (chunk := s.recv(4096)):
            reply += chunk.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408"), reply
        assert time.monotonic() - t0 < 8
        assert '"request_timeout"' in reply


def test_hostile_files_never_give_500_and_the_gateway_survives(http, gateway):
    rng = random.Random(7)
    seeds = [encode(Image.effect_noise((64, 48), 60).convert(m), f) for m, f in
             (("RGB", "JPEG"), ("RGB", "PNG"), ("P", "GIF"), ("RGB", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"))]
    statuses = set()
    for i in range(120):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        r = http.post("/v1/classify", files=[("files", (f"m{i}", bytes(data), "application/octet-stream"))])
        assert r.status_code in (200, 400, 413, 415, 422), r.text
        statuses.add(r.status_code)
    assert 200 in statuses and len(statuses) > 1
    assert gateway.proc.poll() is None
    assert http.get("/healthz").status_code == 200


def test_multipart_details(http, images):
    png = png_bytes(images[0][0])
    body = (b"preamble to ignore\r\n--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"files\"; "
            b"filename=\"\"\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--XyZ--\r\nepilogue")
    r = http.post("/v1/classify", content=body, headers={"content-type": 'multipart/form-data; boundary="XyZ"'})
    assert r.status_code == 200, r.text
    assert [p["filename"] for p in r.json()["predictions"]] == ["été.png"]
    unterminated = body[: body.index(b"--XyZ--")]
    assert_error(http.post("/v1/classify", content=unterminated, headers={"content-type":
                                                                          "multipart/form-data; boundary=XyZ"}),
                 400, "invalid_multipart")
    assert_error(http.post("/v1/classify", content=body, headers={"content-type": "multipart/form-data"}),
                 400, "invalid_multipart")


def test_deeply_nested_json_is_a_400(http):
    assert_error(http.post("/v1/classify", content=b"[" * 200_000 + b"]" * 200_000,
                           headers={"content-type": "application/json"}), 400, "invalid_json")


def test_concurrent_requests_share_calls_but_get_their_own_answers(gateway, model_server, images):
    import asyncio

    pixels, _ = images
    with ModelServerClient(model_server.target) as direct:
        want = {v: direct.predict_pixels(pixels, version=v).probabilities for v in (1, 2)}

    async def one(client: httpx.AsyncClient, i: int):
        idx = [i % 16, (i * 5 + 3) % 16][: 1 + i % 2]  # one or two images per request
        label = ("stable", "canary")[i % 3 == 0]
        files = [("files", (f"{j}.png", png_bytes(pixels[j]), "image/png")) for j in idx]
        r = await client.post("/v1/classify", files=files, params={"label": label, "all_probabilities": "true"})
        return idx, label, r

    async def run():
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(48)))

    for idx, label, r in asyncio.run(run()):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == {"stable": 1, "canary": 2}[label]
        for j, pred in zip(idx, body["predictions"], strict=True):
            assert pred["filename"] == f"{j}.png"
            got = [pred["probabilities"][n] for n in contract.CLASS_NAMES]
            np.testing.assert_allclose(got, want[body["version"]][j], atol=1e-5)
    text = httpx.get(gateway.url + "/metrics").text
    assert "gateway_model_batch_images_count" in text
