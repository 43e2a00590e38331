"""The embedded model server as a real process: TF Serving's REST and gRPC API, errors, labels, reloads,
batching, health and metrics. One server (two versions, labels) is shared by the module."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.protos.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    regression_pb2,
)
from client.protos.tensorflow_serving.config import model_server_config_pb2
from tests.modelserver_helpers import (
    ROOT,
    pixels,
    png_bytes,
    predict_request,
    probabilities,
    start_server,
)

BATCHING = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 50000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
"""


def model_config(base: Path, policy: str = "latest { num_versions: 2 }", labels: dict | None = None,
                 extra: str = "") -> str:
    lab = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in (labels or {}).items())
    return (f'model_config_list {{\n  config {{\n    name: "cifar10"\n    base_path: "{base}"\n'
            f'    model_platform: "tensorflow"\n    model_version_policy {{ {policy} }}\n{lab}  }}\n{extra}}}\n')


def config_proto(text: str) -> model_server_config_pb2.ModelServerConfig:
    from google.protobuf import text_format

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


@pytest.fixture(scope="module")
def served(tmp_path_factory, exported_model):
    work = tmp_path_factory.mktemp("modelserver")
    base = work / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    shutil.copytree(exported_model, base / "2")
    (work / "models.config").write_text(model_config(base, labels={"stable": 1, "canary": 2}))
    (work / "batching.config").write_text(BATCHING)
    server = start_server(
        work, f"--model_config_file={work / 'models.config'}", "--enable_batching",
        f"--batching_parameters_file={work / 'batching.config'}",
        f"--monitoring_config_file={ROOT / 'serving/config/monitoring.config'}",
        "--enable_grpc_healthcheck_service", "--file_system_poll_wait_seconds=0.5",
    )
    server.wait_for(lambda: set(server.status()) == {1, 2} and all(
        s[0] == "AVAILABLE" for s in server.status().values()), what="both versions AVAILABLE")
    server.base = base
    server.work = work
    yield server
    assert server.stop() == 0


def reload(server, text: str) -> None:
    req = model_management_pb2.ReloadConfigRequest(config=config_proto(text))
    server.model_stub.HandleReloadConfigRequest(req, timeout=120)


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=30)
    return info.value


# --- REST predict ------------------------------------------------------------------------------------------

def test_rest_row_and_columnar_match_grpc(served):
    images = pixels(3, seed=1)
    want = probabilities(served.predict_stub.Predict(predict_request(images, version=1), timeout=30))
    row = httpx.post(f"{served.rest}/v1/models/cifar10/versions/1:predict",
                     json={"instances": images.tolist()}, timeout=30)
    assert row.status_code == 200, row.text
    preds = row.json()["predictions"]
    assert len(preds) == 3 and set(preds[0]) == {"probabilities", "class_ids", "class_names", "classes"}
    np.testing.assert_allclose([p["probabilities"] for p in preds], want, atol=1e-6)
    assert [p["class_ids"] for p in preds] == list(want.argmax(1))
    col = httpx.post(f"{served.rest}/v1/models/cifar10/versions/1:predict",
                     json={"inputs": {"images": images.tolist()}}, timeout=30)
    outputs = col.json()["outputs"]
    np.testing.assert_allclose(outputs["probabilities"], want, atol=1e-6)
    assert outputs["classes"][0][3] == "cat"


def test_rest_b64_encoded_images_and_gzip(served):
    images = pixels(2, seed=2)
    body = {"signature_name": "predict_images",
            "instances": [{"b64": base64.b64encode(png_bytes(img)).decode()} for img in images]}
    r = httpx.post(f"{served.rest}/v1/models/cifar10/versions/1:predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    want = probabilities(served.predict_stub.Predict(predict_request(images, version=1), timeout=30))
    np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]], want, atol=1e-5)
    z = httpx.post(f"{served.rest}/v1/models/cifar10/versions/1:predict", content=gzip.compress(
        json.dumps(body).encode()), headers={"Content-Encoding": "gzip"}, timeout=30)
    assert z.status_code == 200 and z.json() == r.json()
    # columnar, a single named b64 input
    c = httpx.post(f"{served.rest}/v1/models/cifar10:predict", timeout=30, json={
        "signature_name": "predict_images", "inputs": {"image_bytes": body["instances"][:1]}})
    assert c.status_code == 200 and len(c.json()["outputs"]["class_names"]) == 1


def test_grpc_both_signatures_output_filter_and_labels(served):
    images = pixels(4, seed=3)
    resp = served.predict_stub.Predict(predict_request(images, label="canary"), timeout=30)
    assert resp.model_spec.version.value == 2 and resp.model_spec.signature_name == "serving_default"
    assert set(resp.outputs) == {"probabilities", "class_ids", "class_names", "classes"}
    req = predict_request(np.array([png_bytes(i) for i in images], dtype=object), signature="predict_images",
                          key="image_bytes", label="stable")
    req.output_filter.extend(["class_names", "probabilities"])
    enc = served.predict_stub.Predict(req, timeout=30)
    assert enc.model_spec.version.value == 1 and set(enc.outputs) == {"class_names", "probabilities"}
    np.testing.assert_allclose(probabilities(enc), probabilities(resp), atol=1e-5)
    latest = served.predict_stub.Predict(predict_request(images[:1]), timeout=30)
    assert latest.model_spec.version.value == 2  # no version: the highest available answers


# --- status and metadata -------------------------------------------------------------------------------------

def test_status_and_metadata_rest_and_grpc(served):
    r = httpx.get(f"{served.rest}/v1/models/cifar10", timeout=10).json()
    assert r == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    one = httpx.get(f"{served.rest}/v1/models/cifar10/labels/stable", timeout=10).json()
    assert [s["version"] for s in one["model_version_status"]] == ["1"]
    md = httpx.get(f"{served.rest}/v1/models/cifar10/versions/1/metadata", timeout=10).json()
    assert md["model_spec"] == {"name": "cifar10", "signature_name": "", "version": "1"}
    sigs = md["metadata"]["signature_def"]["signature_def"]
    assert sigs["serving_default"]["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert sigs["predict_images"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert sigs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "cifar10"
    resp = served.predict_stub.GetModelMetadata(req, timeout=10)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigmap)
    assert resp.model_spec.version.value == 2 and "predict_images" in sigmap.signature_def


# --- the error table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,message", [
    (":predict", b"", 400, "JSON Parse error: The document is empty"),
    (":predict", b"{nope", 400, "JSON Parse error: Missing a name for object member"),
    (":predict", b"[1", 400, "JSON Parse error: "),
    (":predict", b"{}", 400, "Missing 'inputs' or 'instances' key"),
    (":predict", b'{"instances": [], "inputs": []}', 400,
     "expecting only one of 'inputs' or 'instances' keys to exist"),
    (":predict", b'{"instances": []}', 400, "No values in 'instances' array"),
    (":predict", b'{"signature_name": "s", "instances": [1]}', 400,
     'Serving signature name: "s" not found in signature def'),
    (":predict", b'{"instances": [[[[1,2,3]]], [[[1,2]]]]}', 400, "Expecting tensor size: 3 but got: 2"),
    (":predict", b'{"instances": [{"b64": "AAAA"}]}', 400, "is not of expected type: uint8"),
    (":predict", b'{"instances": [[[[1.5, 2, 3]]]]}', 400, "is not of expected type: uint8"),
    (":predict", b'{"instances": [[[[1, 2, 3]]]]}', 400, "images"),
    (":predict", b'{"signature_name": 3, "instances": [1]}', 400, "'signature_name' key must be a string value"),
    ("/versions/7:predict", b'{"instances": [1]}', 404, "Servable not found for request: Specific(cifar10, 7)"),
    ("/labels/gold:predict", b'{"instances": [1]}', 400, "Unrecognized servable version label: gold"),
    (":classify", b'{"examples": [{"x": 1}]}', 400,
     "Expected classification signature method_name to be tensorflow/serving/classify. "
     "Was: tensorflow/serving/predict"),
    (":regress", b'{"examples": [{"x": 1}]}', 400, "Expected regression signature method_name"),
    (":explain", b"{}", 400, "Malformed request: POST /v1/models/cifar10:explain"),
])
def test_rest_errors(served, path, body, status, message):
    r = httpx.post(f"{served.rest}/v1/models/cifar10{path}", content=body, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_rest_errors_other_routes(served):
    r = httpx.post(f"{served.rest}/v1/models/nope:predict", content=b'{"instances": [1]}', timeout=10)
    assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Latest(nope)"})
    r = httpx.get(f"{served.rest}/v1/models/nope", timeout=10)
    assert (r.status_code, r.json()) == (404, {"error": "Could not find any versions of model nope"})
    r = httpx.get(f"{served.rest}/v1/models/cifar10/versions/9", timeout=10)
    assert (r.status_code, r.json()["error"]) == (404, "Could not find version 9 of model cifar10")
    r = httpx.get(f"{served.rest}/v1/models", timeout=10)
    assert (r.status_code, r.json()["error"]) == (400, "Missing model name in request.")
    f32 = {"instances": [{"b64": "AAAA"}]}
    r = httpx.post(f"{served.rest}/v1/models/cifar10/versions/1:predict", json=f32, timeout=10)
    assert "Type: Object is not of expected type: uint8" in r.json()["error"]
    assert httpx.get(f"{served.rest}/elsewhere", timeout=10).status_code == 404


def test_grpc_errors(served):
    stub = served.predict_stub
    e = rpc_error(stub.Predict, predict_request(pixels(1), name="nope"))
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)")
    e = rpc_error(stub.Predict, predict_request(pixels(1), version=7))
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND,
                                       "Servable not found for request: Specific(cifar10, 7)")
    e = rpc_error(stub.Predict, predict_request(pixels(1), label="gold"))
    assert (e.code(), e.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: gold")
    e = rpc_error(stub.Predict, predict_request(pixels(1), signature="s"))
    assert (e.code(), e.details()) == (grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "s" not found.')
    req = predict_request(pixels(1))
    req.inputs["extra"].CopyFrom(req.inputs["images"])
    e = rpc_error(stub.Predict, req)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("input size does not match signature: 2!=1 len({extra,images}) != len({images})."
                                  " Sent extra: {extra}. Missing but required: {}.")
    e = rpc_error(stub.Predict, predict_request(pixels(1), key="pixels"))
    assert e.details() == ("input tensor alias not found in signature: pixels. "
                           "Inputs expected to be in the set {images}.")
    e = rpc_error(stub.Predict, predict_request(pixels(1).astype(np.float32)))
    assert (e.code(), e.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                       "Expects arg[0] to be uint8 but float is provided")
    e = rpc_error(stub.Predict, predict_request(pixels(1)[:, :, :, 0]))  # wrong rank must not crash the server
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    req = predict_request(pixels(1))
    req.output_filter.append("logits")
    e = rpc_error(stub.Predict, req)
    assert e.details().startswith("output tensor alias not found in signature: logits")
    bad = predict_request(np.array([b"not an image"], dtype=object), signature="predict_images", key="image_bytes")
    assert rpc_error(stub.Predict, bad).code() == grpc.StatusCode.INVALID_ARGUMENT
    md = get_model_metadata_pb2.GetModelMetadataRequest()
    md.model_spec.name = "cifar10"
    e = rpc_error(stub.GetModelMetadata, md)
    assert e.details() == "GetModelMetadataRequest must specify at least one metadata_field"
    st = get_model_status_pb2.GetModelStatusRequest()
    st.model_spec.name = "nope"
    e = rpc_error(served.model_stub.GetModelStatus, st)
    assert (e.code(), e.details()) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
    # The server still answers after all of the above.
    assert served.predict_stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value == 2


def test_classify_regress_multi_inference_answer_as_tf_serving(served):
    c = classification_pb2.ClassificationRequest()
    c.model_spec.name = "cifar10"
    e = rpc_error(served.predict_stub.Classify, c)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == ("Expected classification signature method_name to be tensorflow/serving/classify. "
                           "Was: tensorflow/serving/predict")
    r = regression_pb2.RegressionRequest()
    r.model_spec.name = "cifar10"
    r.model_spec.signature_name = "nope"
    e = rpc_error(served.predict_stub.Regress, r)
    assert e.details() == "No signature was found with the name: nope"
    m = inference_pb2.MultiInferenceRequest()
    task = m.tasks.add(method_name="tensorflow/serving/predict")
    task.model_spec.name = "cifar10"
    e = rpc_error(served.predict_stub.MultiInference, m)
    assert (e.code(), e.details()) == (grpc.StatusCode.UNIMPLEMENTED,
                                       "Unsupported signature method_name: tensorflow/serving/predict")


# --- health, metrics, batching ---------------------------------------------------------------------------

def test_health_service(served):
    stub = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "tensorflow.serving.PredictionService", "ModelService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def metric_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_concurrent_requests_coalesce_into_batches(served):
    def scrape() -> str:
        return httpx.get(f"{served.rest}/monitoring/prometheus/metrics", timeout=10).text

    name = ":tensorflow:serving:batching_session:processed_batch_size"
    before = scrape()
    n = 16
    requests = [predict_request(pixels(1, seed=i), version=1) for i in range(n)]
    # All in flight at once from one thread: 16 client threads released by a barrier reach the server spread
    # over milliseconds on a loaded 2-core machine, and the idle batcher rightly runs early arrivals alone.
    calls = [served.predict_stub.Predict.future(r, timeout=30) for r in requests]
    errors = [c.exception() for c in calls if c.exception() is not None]
    assert not errors
    after = scrape()
    batches = (metric_sum(after, name + "_count", model_version="1")
               - metric_sum(before, name + "_count", model_version="1"))
    images = metric_sum(after, name + "_sum", model_version="1") - metric_sum(before, name + "_sum",
                                                                                model_version="1")
    assert images == n
    assert batches <= n / 3, f"{n} concurrent requests ran as {batches} model calls"


def test_metrics_names_and_version_label(served):
    served.predict_stub.Predict(predict_request(pixels(1), version=2), timeout=30)
    httpx.post(f"{served.rest}/v1/models/cifar10/versions/2:predict", json={"instances": pixels(1).tolist()})
    text = httpx.get(f"{served.rest}/monitoring/prometheus/metrics", timeout=10).text
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert "# TYPE :tensorflow:serving:request_latency histogram" in text
    assert metric_sum(text, ":tensorflow:serving:request_count", model_name="cifar10", model_version="2",
                      status="OK") >= 2
    assert metric_sum(text, ":tensorflow:serving:request_latency_count", API="predict", entrypoint="REST",
                      model_version="2") >= 1
    assert metric_sum(text, ":tensorflow:serving:request_count", status="NOT_FOUND") >= 1


# --- config reloads: labels and policies ---------------------------------------------------------------

def test_reload_config_labels_and_policies(served):
    base = served.base
    # A label may only name a loaded version.
    e = rpc_error(served.model_stub.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest(
        config=config_proto(model_config(base, labels={"stable": 1, "canary": 9}))))
    assert (e.code(), e.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "Request to assign label to version 9 of model cifar10, which is not currently available for inference")
    dup = model_config(base) .replace("model_config_list {", "model_config_list {\n  config { name: \"cifar10\" "
                                      f"base_path: \"{base}\" }}")
    e = rpc_error(served.model_stub.HandleReloadConfigRequest,
                  model_management_pb2.ReloadConfigRequest(config=config_proto(dup)))
    assert e.details() == "Illegal to list model cifar10 multiple times in config list"
    e = rpc_error(served.model_stub.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest(
        config=config_proto(model_config(Path("models/cifar10")))))
    assert e.details() == ("Expected model cifar10 to have an absolute path or URI; "
                           "got base_path()=models/cifar10")
    # Move the labels (both versions available).
    reload(served, model_config(base, labels={"stable": 2, "canary": 1}))
    assert served.predict_stub.Predict(predict_request(pixels(1), label="stable"), timeout=30) \
        .model_spec.version.value == 2
    # specific {1}: version 2 is unloaded, 1 keeps serving.
    reload(served, model_config(base, "specific { versions: 1 }"))
    served.wait_for(lambda: served.status()[2][0] == "END", what="version 2 unloaded")
    assert served.status()[1][0] == "AVAILABLE"
    assert served.predict_stub.Predict(predict_request(pixels(1)), timeout=30).model_spec.version.value == 1
    e = rpc_error(served.predict_stub.Predict, predict_request(pixels(1), label="stable"))
    assert e.details() == "Unrecognized servable version label: stable"
    # all {}: both again; back to the module's starting config.
    reload(served, model_config(base, "all {}"))
    assert {v: s[0] for v, s in served.status().items()} == {1: "AVAILABLE", 2: "AVAILABLE"}
    reload(served, model_config(base, labels={"stable": 1, "canary": 2}))
    assert served.predict_stub.Predict(predict_request(pixels(1), label="canary"), timeout=30) \
        .model_spec.version.value == 2


# --- start-up errors (no TensorFlow import needed) ----------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--batching_parameters_file=/nonexistent"], "requires --enable_batching"),
    (["--enable_batching", "--batching_parameters_file={bad}"], "max_batch_sizes"),
    (["--model_config_file={garbage}"], "invalid model config file"),
    ([], "model_base_path and server_options.model_config_file are empty"),
])
def test_startup_errors(tmp_path, flags, message):
    (tmp_path / "bad.config").write_text("max_batch_sizes { value: 4 }\n")
    (tmp_path / "garbage.config").write_text("model_config_list { nonsense }\n")
    args = [f.format(bad=tmp_path / "bad.config", garbage=tmp_path / "garbage.config") for f in flags]
    proc = subprocess.run([sys.executable, "-m", "serving.modelserver", "--port=0", "--rest_api_port=0", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stderr


# --- shipped configuration files and the launcher (no server process) ------------------------------------

def test_shipped_config_files_parse():
    from serving.modelserver.config import parse_batching, parse_monitoring, read_model_config

    cfg = read_model_config(str(ROOT / "serving/config/models.config"))
    model = cfg.model_config_list.config[0]
    assert (model.name, model.base_path, model.model_platform) == ("cifar10", "/models/cifar10", "tensorflow")
    assert set(model.version_labels) == {"stable", "canary"}
    batching = parse_batching(str(ROOT / "serving/config/batching.config"))
    assert batching.max_batch_size == 64 and batching.num_batch_threads >= 1
    monitoring = parse_monitoring(str(ROOT / "serving/config/monitoring.config"))
    assert monitoring.prometheus_enabled and monitoring.path == "/monitoring/prometheus/metrics"


def test_launcher_picks_embedded_and_strips_its_flags(monkeypatch):
    from serving.modelserver import launch

    monkeypatch.setenv("MODELSERVER_IMPL", "auto")
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.real_binary() is None
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/tensorflow_model_server")
    assert launch.real_binary() == "/usr/bin/tensorflow_model_server"
    monkeypatch.setenv("MODELSERVER_IMPL", "embedded")
    assert launch.real_binary() is None
    argv = ["--port=8500", "--bind_address", "127.0.0.1", "--model_base_path_rewrite=/models=./models",
            "--rest_api_port=8501"]
    assert launch.strip_embedded_flags(argv) == ["--port=8500", "--rest_api_port=8501"]


def test_base_path_rewrite():
    from serving.modelserver.config import read_model_config, rewrite_base_paths

    cfg = read_model_config(str(ROOT / "serving/config/models.config"))
    rewrite_base_paths(cfg, [f"/models={ROOT / 'models'}"])
    assert cfg.model_config_list.config[0].base_path == str(ROOT / "models" / "cifar10")
