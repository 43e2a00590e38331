"""Versions on disk while the embedded model server runs: pick-up, partial folders, broken versions, warm-up,
a swap under continuous load, a full batch queue, and the SIGTERM drain."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import text_format

from client.protos.tensorflow_serving.apis import model_management_pb2, model_pb2, predict_pb2, prediction_log_pb2
from tests.modelserver_helpers import pixels, png_bytes, predict_request, start_server

RETRIES = ["--max_num_load_retries=1", "--load_retry_interval_micros=200000"]


def write_config(path: Path, base: Path, labels: dict[str, int]) -> None:
    lab = "".join(f'version_labels {{ key: "{k}" value: {v} }} ' for k, v in labels.items())
    path.write_text(f'model_config_list {{ config {{ name: "cifar10" base_path: "{base}" '
                    f'model_platform: "tensorflow" {lab}}} }}\n')


@pytest.fixture(scope="module")
def versions_server(tmp_path_factory, exported_model):
    work = tmp_path_factory.mktemp("modelserver-versions")
    base = work / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    write_config(work / "models.config", base, {"stable": 1})
    server = start_server(work, f"--model_config_file={work / 'models.config'}",
                          "--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=0.3",
                          "--allow_version_labels_for_unavailable_models", *RETRIES,
                          env={"MODELSERVER_INCOMPLETE_SETTLE_S": "4"})
    server.base, server.work, server.source = base, work, exported_model
    yield server
    assert server.stop() == 0


def copy_atomically(src: Path, base: Path, version: int) -> None:
    tmp = base / f".tmp-{version}"
    shutil.copytree(src, tmp)
    tmp.rename(base / str(version))


def test_partial_folder_is_never_loaded_then_picked_up_when_complete(versions_server):
    s = versions_server
    target = s.base / "2"
    (target / "variables").mkdir(parents=True)
    shutil.copy(s.source / "saved_model.pb", target / "saved_model.pb")
    data = (s.source / "variables" / "variables.data-00000-of-00001").read_bytes()
    # A slow writer: the data shard grows for ~2 s, the index comes last.
    with open(target / "variables" / "variables.data-00000-of-00001", "wb") as fh:
        for i in range(10):
            fh.write(data[i * len(data) // 10:(i + 1) * len(data) // 10])
            fh.flush()
            time.sleep(0.2)
            assert 2 not in s.status(), "a version folder being written was picked up"
    time.sleep(1.0)
    assert 2 not in s.status()  # still no index: incomplete
    assert s.predict_stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value == 1
    shutil.copy(s.source / "variables" / "variables.index", target / "variables" / "variables.index")
    shutil.copytree(s.source / "assets.extra", target / "assets.extra")
    s.wait_for(lambda: s.status().get(2, ("",))[0] == "AVAILABLE", what="version 2 AVAILABLE")
    # Latest 1: version 1 goes only after 2 is available.
    s.wait_for(lambda: s.status()[1][0] == "END", what="version 1 unloaded")
    assert s.status()[1][1] == "OK"


def test_broken_version_ends_with_error_while_others_serve(versions_server):
    s = versions_server
    bad = s.base / ".tmp-3"
    shutil.copytree(s.source, bad)
    (bad / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    bad.rename(s.base / "3")
    s.wait_for(lambda: s.status().get(3, ("",))[0] == "END", timeout=60, what="broken version 3 in END")
    state, code, message = s.status()[3]
    assert code != "OK" and message
    assert s.status()[2][0] == "AVAILABLE"
    assert s.predict_stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value == 2
    r = httpx.get(f"{s.rest}/v1/models/cifar10/versions/3", timeout=10).json()
    assert r["model_version_status"][0]["state"] == "END"
    assert r["model_version_status"][0]["status"]["error_message"] == message


def test_warmup_is_replayed_before_available(versions_server):
    s = versions_server
    tmp = s.base / ".tmp-4"
    shutil.copytree(s.source, tmp)
    # A warm-up record the model cannot answer: the load must fail, so warm-up ran before AVAILABLE.
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="cifar10"))
    request.inputs["not_an_input"].CopyFrom(predict_request(pixels(1)).inputs["images"])
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(tmp / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        writer.write(record.SerializeToString())
    tmp.rename(s.base / "4")
    s.wait_for(lambda: s.status().get(4, ("",))[0] == "END", timeout=60, what="version 4 failed warm-up")
    assert "not_an_input" in s.status()[4][2]
    assert "warm-up records" in s.log()  # good versions replayed theirs


def test_version_swap_under_concurrent_load_has_no_failures(versions_server):
    s = versions_server
    stop = threading.Event()
    failures: list[str] = []
    versions: list[int] = []

    def grpc_client(seed: int) -> None:
        ch = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
        from client.protos.tensorflow_serving.apis import prediction_service_pb2_grpc
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        while not stop.is_set():
            try:
                versions.append(stub.Predict(predict_request(pixels(1, seed)), timeout=30).model_spec.version.value)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
        ch.close()

    def rest_client(seed: int) -> None:
        with httpx.Client(timeout=30) as c:
            body = {"instances": pixels(1, seed).tolist()}
            while not stop.is_set():
                r = c.post(f"{s.rest}/v1/models/cifar10:predict", json=body)
                if r.status_code != 200:
                    failures.append(r.text)

    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(grpc_client, i) for i in range(6)] + [pool.submit(rest_client, i) for i in range(2)]
        time.sleep(1.0)
        copy_atomically(s.source, s.base, 5)
        s.wait_for(lambda: s.status().get(5, ("",))[0] == "AVAILABLE", what="version 5 AVAILABLE")
        s.wait_for(lambda: s.status()[2][0] == "END", what="version 2 unloaded")
        time.sleep(1.0)
        stop.set()
        for f in futs:
            f.result()
    assert not failures, failures[:5]
    assert versions[0] == 2 and versions[-1] == 5 and len(versions) > 20


def test_config_file_poll_moves_labels(versions_server):
    s = versions_server
    # The flag allows a new label on a version that is not loaded (yet); moving an existing one needs it loaded.
    write_config(s.work / "models.config", s.base, {"stable": 5, "next": 9})
    s.wait_for(lambda: s.predict_stub.Predict(predict_request(pixels(1), label="stable"), timeout=30)
               .model_spec.version.value == 5, what="label stable → 5 from the polled config file")
    with pytest.raises(grpc.RpcError) as info:
        s.predict_stub.Predict(predict_request(pixels(1), label="next"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "Servable not found for request: Specific(cifar10, 9)"


QUEUE = """
max_batch_size { value: 8 }
batch_timeout_micros { value: 0 }
max_enqueued_batches { value: 1 }
num_batch_threads { value: 1 }
"""


def test_full_queue_resource_exhausted_then_sigterm_drains(tmp_path, model_base):
    (tmp_path / "batching.config").write_text(QUEUE)
    s = start_server(tmp_path, "--enable_batching", f"--batching_parameters_file={tmp_path / 'batching.config'}",
                     model_base=model_base)
    try:
        # Each request fills a whole batch: one runs, one waits, the rest find the queue full.
        req = predict_request(pixels(8))
        futures = [s.predict_stub.Predict.future(req, timeout=60) for _ in range(12)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert exc.details() == "The batch scheduling queue to which this task was submitted is full"
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        with ThreadPoolExecutor(12) as pool:
            rest = list(pool.map(lambda _: httpx.post(f"{s.rest}/v1/models/cifar10:predict", timeout=60,
                                                      json={"instances": pixels(8).tolist()}).status_code,
                                 range(12)))
        assert 429 in rest and set(rest) <= {200, 429}
        # SIGTERM while two requests are in flight: both finish, then the process exits 0.
        # Two requests on different queues (signatures), so neither can find its queue full.
        encoded = predict_request(np.array([png_bytes(i) for i in pixels(8)], dtype=object),
                                  signature="predict_images", key="image_bytes")
        inflight = [s.predict_stub.Predict.future(r, timeout=60) for r in (req, encoded)]
        time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        for f in inflight:
            assert f.result().model_spec.version.value == 1
        assert s.proc.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError):
            s.predict_stub.Predict(req, timeout=5)
    finally:
        s.stop()


def test_grpc_reload_applies_base_path_rewrite(tmp_path, model_base):
    """A config that names /models/... (as in Docker) works over gRPC reload too, not only at start-up."""
    shutil.copytree(model_base / "1", model_base / "2")
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "cifar10" base_path: "/models/cifar10" '
                      'model_platform: "tensorflow" } }\n')
    server = start_server(tmp_path, f"--model_config_file={config}",
                          f"--model_base_path_rewrite=/models={model_base.parent}")
    try:
        assert server.status() == {2: ("AVAILABLE", "OK", "")}
        req = model_management_pb2.ReloadConfigRequest()
        text_format.Parse('model_config_list { config { name: "cifar10" base_path: "/models/cifar10" '
                          'model_platform: "tensorflow" model_version_policy { all {} } } }', req.config)
        server.model_stub.HandleReloadConfigRequest(req, timeout=120)
        assert server.status() == {1: ("AVAILABLE", "OK", ""), 2: ("AVAILABLE", "OK", "")}
    finally:
        server.stop()
