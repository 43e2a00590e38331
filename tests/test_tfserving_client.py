"""client/tfserving.py: tensor conversion, and both clients against the real model server (versions 1 and 2,
labels stable -> 1, canary -> 2)."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import numpy as np
import pytest
from test_gateway_servers import cifar_images, models_config, png_bytes, start_labelled_server

from client import contract
from client.protos.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from client.protos.tensorflow_serving.config import model_server_config_pb2
from client.tfserving import (
    CHANNEL_OPTIONS,
    MAX_MESSAGE_BYTES,
    AsyncModelServerClient,
    ModelServerClient,
    ModelServerError,
    make_ndarray,
    make_tensor_proto,
)

# ---- conversion (no server) -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int32, np.int64, np.int8, np.int16,
                                   np.uint16, np.bool_, np.float16])
def test_numeric_round_trip_uses_tensor_content(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    proto = make_tensor_proto(array)
    assert proto.tensor_content and [d.size for d in proto.tensor_shape.dim] == [2, 3, 4]
    back = make_ndarray(proto)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_strings_use_string_val():
    proto = make_tensor_proto([b"\x89PNG...", "text"])
    assert proto.dtype == types_pb2.DT_STRING and list(proto.string_val) == [b"\x89PNG...", b"text"]
    assert list(make_ndarray(proto)) == [b"\x89PNG...", b"text"]


def test_typed_value_fields_and_broadcast_are_read():
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2),
                                                   tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    floats = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[0.5, 1, 2, 3])
    np.testing.assert_array_equal(make_ndarray(floats), [[0.5, 1], [2, 3]])
    filled = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=shape, int64_val=[7])
    np.testing.assert_array_equal(make_ndarray(filled), [[7, 7], [7, 7]])
    scalar = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x"])
    assert make_ndarray(scalar).shape == () and make_ndarray(scalar)[()] == b"x"


def test_big_endian_input_is_sent_little_endian():
    proto = make_tensor_proto(np.array([1, 256], dtype=">i4"))
    assert proto.tensor_content == np.array([1, 256], dtype="<i4").tobytes()


def test_channel_limits_are_raised():
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert MAX_MESSAGE_BYTES >= 64 * 1024 * 1024


def test_pixels_must_be_uint8_32x32x3():
    with ModelServerClient("127.0.0.1:1") as client, pytest.raises(ValueError):
        client.predict_pixels(np.zeros((1, 28, 28, 3), np.uint8))


# ---- against the model server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, exported_model):
    srv = start_labelled_server(tmp_path_factory.mktemp("client-models"), exported_model)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with ModelServerClient(server.target, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def images(cifar_archive):
    return cifar_images(cifar_archive, 8)[0]


def test_predict_pixels_and_encoded_agree(client, images):
    pixels = client.predict_pixels(images)
    assert pixels.version == 2 and pixels.probabilities.shape == (8, 10) and pixels.probabilities.dtype == np.float32
    np.testing.assert_allclose(pixels.probabilities.sum(1), 1, atol=1e-4)
    encoded = client.predict_encoded([png_bytes(img) for img in images])
    np.testing.assert_allclose(encoded.probabilities, pixels.probabilities, atol=1e-5)


def test_version_and_label(client, images):
    assert client.predict_pixels(images[:1], version=1).version == 1
    assert client.predict_pixels(images[:1], label="stable").version == 1
    assert client.predict_pixels(images[:1], label="canary").version == 2
    with pytest.raises(ModelServerError) as info:
        client.predict_pixels(images[:1], version=9)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ModelServerError) as info:
        client.predict_pixels(images[:1], label="gold")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        client.predict_pixels(images[:1], version=1, label="stable")


def test_status_and_metadata(client):
    assert [(s.version, s.state, s.error_code) for s in client.model_status()] == [(1, "AVAILABLE", "OK"),
                                                                                   (2, "AVAILABLE", "OK")]
    assert [s.version for s in client.model_status(label="stable")] == [1]
    assert [s.version for s in client.model_status(version=2)] == [2]
    meta = client.metadata()
    assert meta["model_spec"]["name"] == "cifar10" and meta["model_spec"]["version"] == "2"
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    assert contract.PIXELS_INPUT in sigs[contract.DEFAULT_SIGNATURE]["inputs"]
    assert contract.BYTES_INPUT in sigs[contract.IMAGES_SIGNATURE]["inputs"]


def test_large_batch_over_4_mib(client):
    batch = np.random.default_rng(0).integers(0, 256, (1500, 32, 32, 3), dtype=np.uint8)  # 4.6 MB request
    assert client.predict_pixels(batch).probabilities.shape == (1500, 10)


def test_reload_config_moves_labels(server, client):
    from google.protobuf import text_format

    def config(labels: dict[str, int]) -> model_server_config_pb2.ModelServerConfig:
        return text_format.Parse(models_config(server.base, (1, 2), labels),
                                 model_server_config_pb2.ModelServerConfig())

    client.reload_config(config({"stable": 2, "canary": 1}))
    assert [s.version for s in client.model_status(label="stable")] == [2]
    with pytest.raises(ModelServerError) as info:
        client.reload_config(config({"stable": 7}))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    client.reload_config(config({"stable": 1, "canary": 2}))
    assert [s.version for s in client.model_status(label="canary")] == [2]


def test_async_client_shares_one_channel(server, images):
    async def run():
        async with AsyncModelServerClient(server.target, timeout=20) as c:
            results = await asyncio.gather(*(c.predict_pixels(images[i:i + 1]) for i in range(8)))
            channel = c._channel
            status = await c.model_status(label="canary")
            meta = await c.metadata(version=1)
            assert c._channel is channel  # one channel for every call
            return results, status, meta

    results, status, meta = asyncio.run(run())
    with ModelServerClient(server.target) as sync:
        want = sync.predict_pixels(images).probabilities
    np.testing.assert_allclose(np.concatenate([r.probabilities for r in results]), want, atol=1e-5)
    assert status[0].version == 2 and meta["model_spec"]["version"] == "1"


def test_unreachable_server_fails_fast_with_unavailable_after_one_retry():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with ModelServerClient(f"127.0.0.1:{port}", timeout=5) as client:
            t0 = time.monotonic()
            with pytest.raises(ModelServerError) as info:
                client.model_status()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - t0 < 3


def test_deadline_exceeded(server, images):
    with ModelServerClient(server.target) as client:
        client.model_status()  # connected
        with pytest.raises(ModelServerError) as info:
            client.predict_pixels(np.repeat(images, 256, axis=0), timeout=0.001)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
