"""End to end: train v1, serve it, classify through the gateway and over gRPC, retrain v2 from v1 while serving,
then canary, promote, roll back and retire under a continuous concurrent load.

The load: async clients looping single-image requests through the `stable` and `canary` labels, both through
the gateway (HTTP) and straight to the model server (gRPC), each request timed on the wall clock.

What "every answer comes from the version its label pointed to at that moment" means here: the deploy tool records,
for each step, `started` (before it writes the config) and `applied` (the reload call returned, so the server has
switched). A label's target is known exactly outside these windows; inside one it is the old or the new target.
A request sent at s and answered at r is correct when its version is a target of its label at some instant of
[s, r]: the target just before s, or the old or new target of any window overlapping [s, r].
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, train_tiny
from test_gateway_servers import Gateway, ModelServer, models_config

from client.contract import CLASS_NAMES
from client.gateway_client import AsyncGatewayClient, GatewayClient
from client.preprocessing import load_image, to_model_input
from client.tfserving import AsyncModelServerClient, ModelServerClient

CHECK = sorted((ROOT / "serving" / "deploy_check").glob("*.png"))
LABELS = ("stable", "canary")


@dataclass
class Answer:
    via: str  # rest | grpc
    label: str
    sent: float
    received: float
    version: int | None = None
    error: str | None = None


class Load:
    """Concurrent clients in a background thread with its own event loop, until stopped."""

    def __init__(self, gateway_url: str, model_server: str, clients_per_label: int = 2) -> None:
        self.gateway_url, self.model_server = gateway_url, model_server
        self.clients_per_label = clients_per_label
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._images = [p.read_bytes() for p in CHECK]
        self._pixels = to_model_input([load_image(b) for b in self._images])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[Answer]:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load generator did not stop"
        return self.answers

    async def _main(self) -> None:
        async with AsyncGatewayClient(self.gateway_url, timeout=30) as gw:
            grpc_client = AsyncModelServerClient(self.model_server, timeout=30)
            try:
                tasks = [self._loop("rest", label, i, gw, grpc_client)
                         for label in LABELS for i in range(self.clients_per_label)]
                tasks += [self._loop("grpc", label, i, gw, grpc_client) for label in LABELS for i in range(1)]
                await asyncio.gather(*tasks)
            finally:
                await grpc_client.close()

    async def _loop(self, via: str, label: str, worker: int, gw: AsyncGatewayClient,
                    grpc_client: AsyncModelServerClient) -> None:
        i = worker
        while not self._stop.is_set():
            i += 1
            k = i % len(self._images)
            answer = Answer(via, label, time.time(), 0.0)
            try:
                if via == "rest":
                    answer.version = (await gw.classify(self._images[k], label=label)).version
                else:
                    answer.version = (await grpc_client.predict_pixels(self._pixels[k:k + 1], label=label)).version
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                answer.error = f"{type(exc).__name__}: {exc}"
            answer.received = time.time()
            self.answers.append(answer)
            await asyncio.sleep(0.005)  # leave the two CPUs some room for the servers and the deploy steps


def label_windows(log: list[dict], initial: dict[str, int]) -> dict[str, list[tuple[float, float, int, int]]]:
    """label -> [(started, applied, old, new)] for every step that moved it, from the deploy history."""
    windows: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in initial}
    current = dict(initial)
    for record in log:
        for step in record["steps"] + record.get("restore", {}).get("steps", []):
            for label, version in step["labels"].items():
                if current.get(label) != version:
                    windows.setdefault(label, []).append((step["started"], step["applied"], current.get(label),
                                                          version))
                    current[label] = version
    return windows


def allowed_versions(windows: list[tuple[float, float, int, int]], initial: int, sent: float,
                     received: float) -> set[int]:
    value, allowed = initial, set()
    for started, applied, old, new in windows:
        if applied < sent:
            value = new
        elif started <= received:
            allowed |= {old, new}
    return allowed | {value}


def deploy(config: Path, target: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "serving.deploy", "--config", str(config), "--model-server", target,
           "--timeout", "90", "--json", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"deploy {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def test_allowed_versions_rule():
    windows = [(10.0, 11.0, 1, 2), (20.0, 21.0, 2, 1)]
    assert allowed_versions(windows, 1, 5, 9) == {1}
    assert allowed_versions(windows, 1, 9, 10.5) == {1, 2}
    assert allowed_versions(windows, 1, 11.5, 19) == {2}
    assert allowed_versions(windows, 1, 12, 25) == {1, 2}
    assert allowed_versions(windows, 1, 22, 23) == {1}


def test_train_serve_classify_redeploy_under_load(tmp_path, model_base, cifar_archive):
    t0 = time.monotonic()
    config = tmp_path / "models.config"
    config.write_text(models_config(model_base, (1,), {"stable": 1, "canary": 1}))
    server = ModelServer(model_base, config)
    gateway = Gateway({"GATEWAY_MODEL_SERVER": server.target, "GATEWAY_MODEL_TIMEOUT": "20"})
    load = None
    try:
        server.start()
        gateway.start(tmp_path)
        phases = {"servers up": time.monotonic() - t0}

        # Classify through the gateway and over gRPC (both signatures): one model, one answer.
        with GatewayClient(gateway.url) as gw, ModelServerClient(server.target) as ms:
            rest = gw.classify(CHECK, label="stable", all_probabilities=True)
            pixels = ms.predict_pixels(to_model_input([load_image(p.read_bytes()) for p in CHECK]), label="stable")
            encoded = ms.predict_encoded([p.read_bytes() for p in CHECK], label="stable")
        assert rest.version == pixels.version == encoded.version == 1
        rest_p = np.array([[p.probabilities[c] for c in CLASS_NAMES] for p in rest.predictions])
        np.testing.assert_allclose(rest_p, pixels.probabilities, atol=1e-5)
        np.testing.assert_allclose(encoded.probabilities, pixels.probabilities, atol=0.02)

        load = Load(gateway.url, server.target)
        load.start()

        # Retrain from the current stable while v1 serves the load: warm start, one short epoch, next version.
        errors: list[BaseException] = []

        def retrain_v2() -> None:
            try:
                train_tiny(tmp_path / "retrain", model_base, cifar_archive, "--warm-start", str(model_base / "1"),
                           "--train-subset", "512", "--val-size", "128")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                errors.append(exc)

        retrain = threading.Thread(target=retrain_v2)
        retrain.start()
        retrain.join(150)
        assert not retrain.is_alive(), "retraining v2 took too long"
        if errors:
            detail = getattr(errors[0], "stderr", "") or ""
            pytest.fail(f"retraining v2 failed: {errors[0]}\n{detail[-3000:]}")
        assert (model_base / "2" / "saved_model.pb").is_file()
        assert json.loads((model_base / "2" / "metadata.json").read_text())["version"] == 2
        phases["retrained v2"] = time.monotonic() - t0

        records = [
            deploy(config, server.target, "canary", "2"),
            deploy(config, server.target, "promote"),
            deploy(config, server.target, "rollback"),
            deploy(config, server.target, "retire", "2"),
        ]
        phases["deployed"] = time.monotonic() - t0
        time.sleep(0.5)  # answers after the last switch, too
        answers = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        gateway.stop()
        server.stop()

    assert [r["target"]["labels"] for r in records] == [
        {"stable": 1, "canary": 2}, {"stable": 2, "canary": 2}, {"stable": 1, "canary": 1},
        {"stable": 1, "canary": 1}]
    assert records[-1]["target"]["versions"] == [1]

    failed = [a for a in answers if a.error]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    history = json.loads(config.with_name("models.history.json").read_text())
    windows = label_windows(history["log"], {"stable": 1, "canary": 1})
    wrong = [a for a in answers
             if a.version not in allowed_versions(windows[a.label], 1, a.sent, a.received)]
    assert not wrong, f"{len(wrong)} answers from a version the label did not point at: {wrong[:5]}; {windows}"

    # The load really ran through every command, on both paths and both versions.
    for record in records:
        during = [a for a in answers if record["started"] <= a.sent and a.received <= record["finished"]]
        assert len(during) >= 3, f"{record['action']}: only {len(during)} requests during the command"
    seen = {(a.via, a.label, a.version) for a in answers}
    assert {("rest", "canary", 2), ("rest", "stable", 2), ("grpc", "canary", 2), ("rest", "stable", 1)} <= seen
    elapsed = time.monotonic() - t0
    switch = {k: [round(e - s, 3) for s, e, _, _ in w] for k, w in windows.items()}
    print(f"\n{len(answers)} requests, 0 failed, {elapsed:.0f} s ({ {k: round(v) for k, v in phases.items()} }); "
          f"switch windows (s): {switch}")
    shutil.rmtree(tmp_path / "retrain", ignore_errors=True)
