"""The deploy tool: config transitions (pure), the config file round trip, and the undo on a failed step against a
real model server subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from google.protobuf import text_format

from client.protos.tensorflow_serving.config import model_server_config_pb2
from serving.deploy.config import (
    DeployError,
    ModelConfigFile,
    Served,
    config_text,
    plan,
    target_canary,
    target_init,
    target_promote,
    target_retire,
    target_rollback,
    versions_on_disk,
    write_atomic,
)

S = Served.of


def names(steps):
    return [(s.name, sorted(s.served.versions), s.served.label_map) for s in steps]


def assert_labels_always_loaded(current, steps):
    """The rule TF Serving enforces: after each step every label points at a version loaded before it."""
    loaded = set(current.versions)
    for step in steps:
        for label, version in step.served.labels:
            assert version in loaded, f"{step.name}: {label} -> {version} not loaded yet"
        loaded = set(step.served.versions)


# ---- transitions ---------------------------------------------------------------------------------------------


def test_init_from_nothing_loads_then_labels():
    current = S({1})
    target = target_init(current, 1)
    assert names(plan(current, target)) == [("relabel", [1], {"canary": 1, "stable": 1})]


def test_canary_is_load_then_relabel():
    current = S({1}, {"stable": 1, "canary": 1})
    target = target_canary(current, 2, [1])
    steps = plan(current, target)
    assert names(steps) == [
        ("load", [1, 2], {"canary": 1, "stable": 1}),
        ("relabel", [1, 2], {"canary": 2, "stable": 1}),
    ]
    assert_labels_always_loaded(current, steps)


def test_promote_is_one_label_move_keeping_old_stable():
    current = S({1, 2}, {"stable": 1, "canary": 2})
    steps = plan(current, target_promote(current))
    assert names(steps) == [("relabel", [1, 2], {"canary": 2, "stable": 2})]


def test_promote_of_an_unloaded_canary_loads_first():
    # A config edited by hand: canary points at 2 but only 1 is listed (the server would refuse it anyway).
    current = S({1, 2}, {"stable": 1, "canary": 2})
    current = Served(frozenset({1}), current.labels)
    steps = plan(current, target_promote(current))
    assert [s.name for s in steps] == ["load", "relabel"]


def test_rollback_goes_to_previous_stable_and_reloads_it_if_needed():
    current = S({2}, {"stable": 2, "canary": 2})
    target, back = target_rollback(current, [1, 2])
    assert back == 1
    steps = plan(current, target)
    assert names(steps) == [
        ("load", [1, 2], {"canary": 2, "stable": 2}),
        ("relabel", [1, 2], {"canary": 1, "stable": 1}),
    ]
    assert_labels_always_loaded(current, steps)


def test_rollback_without_history_is_refused():
    with pytest.raises(DeployError, match="no previous stable"):
        target_rollback(S({1}, {"stable": 1, "canary": 1}), [1])


def test_retire_of_the_canary_moves_the_label_before_unloading():
    current = S({1, 2}, {"stable": 1, "canary": 2})
    steps = plan(current, target_retire(current, 2))
    assert names(steps) == [
        ("relabel", [1, 2], {"canary": 1, "stable": 1}),
        ("unload", [1], {"canary": 1, "stable": 1}),
    ]
    assert_labels_always_loaded(current, steps)


def test_retire_of_stable_or_unserved_is_refused():
    current = S({1, 2}, {"stable": 1, "canary": 1})
    with pytest.raises(DeployError, match="stable"):
        target_retire(current, 1)
    with pytest.raises(DeployError, match="not served"):
        target_retire(current, 7)


def test_canary_replacing_a_canary_unloads_it_but_keeps_previous_stables():
    current = S({1, 2, 3}, {"stable": 2, "canary": 3})
    target = target_canary(current, 4, [1, 2])
    assert sorted(target.versions) == [1, 2, 4]  # 1 was stable once: kept for rollback; 3 dropped
    steps = plan(current, target)
    assert [s.name for s in steps] == ["load", "relabel", "unload"]
    assert_labels_always_loaded(current, steps)


def test_commands_need_a_stable_label():
    with pytest.raises(DeployError, match="init"):
        target_canary(S({1}), 2, [])
    with pytest.raises(DeployError, match="no canary"):
        target_promote(S({1}, {"stable": 1, "canary": 1}))


def test_full_cycle_every_step_is_valid():
    history = [1]
    state = S({1}, {"stable": 1, "canary": 1})
    for make in (
        lambda s: target_canary(s, 2, history),
        target_promote,
        lambda s: target_rollback(s, [1, 2])[0],
        lambda s: target_retire(s, 2),
    ):
        target = make(state)
        assert_labels_always_loaded(state, plan(state, target))
        state = target
    assert state == S({1}, {"stable": 1, "canary": 1})


# ---- the config file -----------------------------------------------------------------------------------------

CONFIG = """
model_config_list {
  config {
    name: "other"
    base_path: "/models/other"
    model_platform: "tensorflow"
  }
  config {
    name: "cifar10"
    base_path: "%s"
    model_platform: "tensorflow"
  }
}
"""


def test_config_round_trip_keeps_other_models(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(CONFIG % "/models/cifar10")
    config = ModelConfigFile.read(path)
    with pytest.raises(DeployError, match="models-dir"):
        config.served()  # latest policy without knowing the disk
    assert config.served([1, 2, 3]) == S({3})  # TF Serving's default: the latest one
    new = config.with_served(S({3, 4}, {"stable": 3, "canary": 4}))
    write_atomic(path, config_text(new))
    again = ModelConfigFile.read(path)
    assert again.served() == S({3, 4}, {"stable": 3, "canary": 4})
    assert [c.name for c in again.config.model_config_list.config] == ["other", "cifar10"]
    assert again.base_path == "/models/cifar10"
    # What is written parses with protobuf's text format as TF Serving reads it (comments included).
    parsed = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    assert parsed.model_config_list.config[1].version_labels["canary"] == 4
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".models.config.")]  # no temp left behind


def test_bad_configs_are_refused(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("model_config_list { config { name: ")
    with pytest.raises(DeployError, match="cannot read"):
        ModelConfigFile.read(path)
    path.write_text(CONFIG.replace('"cifar10"', '"x"') % "/m")
    with pytest.raises(DeployError, match="exactly once"):
        ModelConfigFile.read(path)


def test_versions_on_disk_are_integer_folders_with_a_saved_model(tmp_path):
    for name in ("1", "2", "tmp-3", "10"):
        (tmp_path / name).mkdir()
    for name in ("1", "10", "tmp-3"):
        (tmp_path / name / "saved_model.pb").write_bytes(b"")
    assert versions_on_disk(tmp_path) == [1, 10]
    assert versions_on_disk(tmp_path / "missing") == []


# ---- against a real model server -----------------------------------------------------------------------------


def write_config(path: Path, base: Path, versions: list[int], labels: dict[str, int]) -> None:
    labels_text = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in labels.items())
    path.write_text(
        "model_config_list {\n  config {\n"
        f'    name: "cifar10"\n    base_path: "{base}"\n    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ specific {{ {' '.join(f'versions: {v}' for v in versions)} }} }}\n"
        f"{labels_text}  }}\n}}\n"
    )


def start_model_server(config: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "serving.modelserver", f"--port={port}", "--rest_api_port=0",
           f"--model_config_file={config}", "--file_system_poll_wait_seconds=1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, port


def wait_available(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    from client.tfserving import ModelServerClient, ModelServerError

    deadline = time.monotonic() + timeout
    with ModelServerClient(f"127.0.0.1:{port}", timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"model server exited: {proc.stderr.read()[-3000:]}")
            try:
                if any(s.state == "AVAILABLE" for s in client.model_status()):
                    return
            except ModelServerError:
                pass
            time.sleep(0.2)
    pytest.fail("model server did not become ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def deploy(config: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serving.deploy", "--config", str(config), "--model-server", f"127.0.0.1:{port}",
           "--timeout", "60", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def served_v1(tmp_path_factory, exported_model):
    """One model server for the tests below, serving version 1 as stable and canary from a config file it also
    polls (for --apply poll). A failed load is not retried, so a broken version fails its step at once."""
    tmp = tmp_path_factory.mktemp("deploy")
    base = tmp / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    config = tmp / "models.config"
    write_config(config, base, [1], {"stable": 1, "canary": 1})
    proc, port = start_model_server(config, "--model_config_file_poll_wait_seconds=1", "--max_num_load_retries=0")
    try:
        wait_available(port, proc)
        yield config, port, base
    finally:
        stop(proc)


def test_failed_canary_is_undone(served_v1):
    """A version that cannot load: the step fails, the old config is back on disk and on the server."""
    config, port, base = served_v1
    before = config.read_text()
    broken = base / "2"
    shutil.copytree(base / "1", broken)
    (broken / "saved_model.pb").write_bytes(b"not a saved model")
    (broken / "variables").rename(broken / "gone")  # make sure no loader can make sense of it
    result = deploy(config, port, "canary", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "undone" in result.stderr
    assert config.read_text() == before
    history = json.loads(config.with_name("models.history.json").read_text())
    record = history["log"][-1]
    assert record["ok"] is False and record["restore"]["ok"] is True
    status = deploy(config, port, "--json", "status")
    rows = {r["version"]: r for r in json.loads(status.stdout)["versions"]}
    assert rows[1]["state"] == "AVAILABLE" and rows[1]["labels"] == ["canary", "stable"]
    assert rows.get(2, {}).get("state") != "AVAILABLE"


def test_refused_preconditions_exit_2_and_change_nothing(served_v1):
    config, port, _ = served_v1
    before = config.read_text()
    for args in (["promote"], ["rollback"], ["retire", "1"], ["canary", "9"]):
        result = deploy(config, port, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert config.read_text() == before


def test_poll_mode_canary_and_promote(served_v1):
    """--apply poll: only the file changes; the server's config polling picks it up. Runs last: it changes labels."""
    config, port, base = served_v1
    shutil.copytree(base / "1", base / "3")
    for args in (["canary", "3"], ["promote"]):
        result = deploy(config, port, "--apply", "poll", *args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert ModelConfigFile.read(config).served() == S({1, 3}, {"stable": 3, "canary": 3})
    steps = json.loads(config.with_name("models.history.json").read_text())["log"][-1]["steps"]
    assert [s["name"] for s in steps] == ["relabel"] and steps[0]["checks"][0]["version"] == 3
