"""Real processes for the gateway and client tests: the model server and the gateway on 127.0.0.1.

No tests here: helpers and fixtures imported by tests/test_gateway*.py and tests/test_tfserving_client.py.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, free_port
from PIL import Image

from client.tfserving import ModelServerClient, ModelServerError

SERVER_START_TIMEOUT = 120.0


def models_config(base: Path, versions: tuple[int, ...] = (1, 2), labels: dict[str, int] | None = None) -> str:
    policy = " ".join(f"versions: {v}" for v in versions)
    lines = [f'    version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items()]
    return "\n".join([
        "model_config_list {", "  config {", '    name: "cifar10"', f'    base_path: "{base}"',
        '    model_platform: "tensorflow"', f"    model_version_policy {{ specific {{ {policy} }} }}", *lines,
        "  }", "}", ""])


@dataclass
class ModelServer:
    base: Path
    config: Path | None
    port: int = field(default_factory=free_port)
    rest_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_versions: int = 1) -> None:
        cmd = [sys.executable, "-m", "serving.modelserver", f"--port={self.port}", f"--rest_api_port={self.rest_port}"]
        if self.config:
            cmd.append(f"--model_config_file={self.config}")
        else:
            cmd += ["--model_name=cifar10", f"--model_base_path={self.base}"]
        self.log = self.log or self.base.parent / f"modelserver-{self.port}.log"
        out = open(self.log, "ab")  # noqa: SIM115 - the process writes to it until stopped
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        out.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        with ModelServerClient(self.target, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"the model server exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    states = client.model_status()
                    if sum(s.state == "AVAILABLE" for s in states) >= wait_versions:
                        return
                except ModelServerError:
                    pass
                time.sleep(0.2)
        pytest.fail(f"the model server did not become ready in {SERVER_START_TIMEOUT} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Gateway:
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    startup_seconds: float = 0.0
    startup_cpu_seconds: float = 0.0  # user + system time of the process until /healthz first answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        self.log = log_dir / f"gateway-{self.port}.log"
        env = {**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port), **self.env}
        out = open(self.log, "ab")  # noqa: SIM115
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.gateway"], cwd=ROOT, env=env, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        while time.monotonic() - t0 < 30:
            if self.proc.poll() is not None:
                pytest.fail(f"the gateway exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    self.startup_seconds = time.monotonic() - t0
                    fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
                    self.startup_cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        pytest.fail(f"the gateway did not start:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


def two_version_base(tmp: Path, exported_model: Path) -> Path:
    base = tmp / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    shutil.copytree(exported_model, base / "2")
    return base


def start_labelled_server(tmp: Path, exported_model: Path) -> ModelServer:
    """Versions 1 and 2 with labels stable -> 1 and canary -> 2, from a model config file."""
    base = two_version_base(tmp, exported_model)
    config = tmp / "models.config"
    config.write_text(models_config(base, (1, 2), {"stable": 1, "canary": 2}))
    server = ModelServer(base, config)
    server.start(wait_versions=2)
    return server


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def cifar_images(archive: Path, n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from training.data import load_cifar10

    test = load_cifar10(archive).test
    return test.images[:n], test.labels[:n]
