"""The gateway client library against a real gateway and model server (versions 1 and 2, stable -> 1, canary -> 2)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import ROOT, free_port
from PIL import Image
from test_gateway_servers import Gateway, start_labelled_server

from client import contract
from client.gateway_client import (
    AsyncGatewayClient,
    ClassifyResult,
    GatewayClient,
    GatewayError,
    ModelsInfo,
)

CHECK = sorted((ROOT / "serving" / "deploy_check").glob("*.png"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, exported_model):
    tmp = tmp_path_factory.mktemp("gw-client")
    server = start_labelled_server(tmp, exported_model)
    gateway = Gateway({"GATEWAY_MODEL_SERVER": server.target})
    try:
        gateway.start(tmp)
        yield gateway.url, server.target, tmp
    finally:
        gateway.stop()
        server.stop()


@pytest.fixture(scope="module")
def url(stack):
    return stack[0]


def test_classify_paths_bytes_and_pil_images(url):
    with GatewayClient(url) as gw:
        pil = Image.open(CHECK[0]).convert("RGB")
        result = gw.classify([CHECK[0], CHECK[1].read_bytes(), pil], top_k=2, label="stable")
    assert isinstance(result, ClassifyResult)
    assert result.model == contract.MODEL_NAME and result.version == 1
    assert [len(p.top) for p in result.predictions] == [2, 2, 2]
    assert result.predictions[0].filename == CHECK[0].name
    first = result.predictions[0]
    assert first.best.class_name in contract.CLASS_NAMES
    assert contract.CLASS_NAMES[first.best.class_id] == first.best.class_name
    assert first.top[0].probability >= first.top[1].probability
    # The same image as a path and as a PIL image (sent as PNG) gets the same answer.
    assert result.predictions[2].top == first.top
    assert result.predictions[0].probabilities is None


def test_version_label_and_all_probabilities(url):
    with GatewayClient(url) as gw:
        assert gw.classify(CHECK[0], label="canary").version == 2
        assert gw.classify(CHECK[0], version=1).version == 1
        result = gw.classify(CHECK[:3], all_probabilities=True, top_k=10)
    for p in result.predictions:
        assert set(p.probabilities) == set(contract.CLASS_NAMES)
        assert abs(sum(p.probabilities.values()) - 1) < 1e-3
        assert [t.class_name for t in p.top] == sorted(p.probabilities, key=p.probabilities.get, reverse=True)


def test_errors_carry_the_gateway_code(url):
    with GatewayClient(url) as gw:
        with pytest.raises(GatewayError) as bad_image:
            gw.classify(b"this is not an image")
        assert 400 <= bad_image.value.status < 500 and bad_image.value.code.replace("_", "").isalpha()
        assert bad_image.value.message and bad_image.value.request_id
        with pytest.raises(GatewayError) as no_label:
            gw.classify(CHECK[0], label="gold")
        assert (no_label.value.status, no_label.value.code) == (404, "label_not_found")
        with pytest.raises(GatewayError) as no_version:
            gw.classify(CHECK[0], version=7)
        assert (no_version.value.status, no_version.value.code) == (404, "version_not_found")
        with pytest.raises(ValueError, match="not both"):
            gw.classify(CHECK[0], version=1, label="stable")
        with pytest.raises(TypeError):
            gw.classify([np.zeros((32, 32, 3))])


def test_models_health_and_readiness(url):
    with GatewayClient(url) as gw:
        info = gw.models()
        assert gw.healthy() and gw.ready()
    assert isinstance(info, ModelsInfo)
    assert {v.version: v.state for v in info.versions} == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert info.label_target("stable") == 1 and info.label_target("canary") == 2


def test_async_client_concurrent_requests(url):
    async def main() -> list[int]:
        async with AsyncGatewayClient(url) as gw:
            results = await asyncio.gather(*(gw.classify(CHECK[i % len(CHECK)], label=("stable", "canary")[i % 2])
                                             for i in range(16)))
            assert (await gw.models()).label_target("canary") == 2
            assert await gw.ready()
            with pytest.raises(GatewayError) as exc:
                await gw.classify(b"", label="stable")
            assert exc.value.status == 400
            return [r.version for r in results]

    assert asyncio.run(main()) == [1, 2] * 8


def test_api_key_is_sent(stack):
    _, target, tmp = stack
    gateway = Gateway({"GATEWAY_MODEL_SERVER": target, "GATEWAY_API_KEYS": "k1,k2"})
    try:
        gateway.start(tmp)
        with GatewayClient(gateway.url) as anonymous, pytest.raises(GatewayError) as exc:
            anonymous.classify(CHECK[0])
        assert (exc.value.status, exc.value.code) == (401, "unauthorized")
        with GatewayClient(gateway.url, api_key="k2") as gw:
            assert gw.classify(CHECK[0], label="stable").version == 1
    finally:
        gateway.stop()


def test_unreachable_gateway_is_a_gateway_error():
    with GatewayClient(f"http://127.0.0.1:{free_port()}", timeout=2) as gw:
        with pytest.raises(GatewayError) as exc:
            gw.models()
    assert (exc.value.status, exc.value.code) == (0, "unavailable")
