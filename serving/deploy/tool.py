"""Carry out a deploy command against a running model server: write, apply, wait, check; undo on failure.

For each step of the plan (serving/deploy/config.py):
1. write the model config file atomically;
2. apply it: `reload` sends HandleReloadConfigRequest with the whole config; `poll` relies on the server
   re-reading the file (`--model_config_file_poll_wait_seconds`), optionally after `--on-write CMD` (for
   instance a `kubectl apply` of the ConfigMap);
3. wait until every version the step serves is AVAILABLE and every version it dropped is no longer AVAILABLE
   (a version whose load failed, state END with an error, fails the step at once);
4. check every label by classifying the bundled CIFAR-10 test images through it (serving/deploy/check.py);
   with `poll`, a label still answering from its old version is waited for, not a failure.

When a step fails, the config from before the command is written back and applied (again as load / relabel /
unload steps, so that even the undo never points a label at a version that is not loaded), and the command
exits non-zero. Each step's wall-clock times are recorded in the history file: `started` (before the file is
written) and `applied` (the reload call returned, or with `poll` the server answered with the new state); a
label moved by a step may answer from either its old or its new version between these two instants only.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.tfserving import ModelServerClient, ModelServerError
from serving.deploy.check import CHECK_IMAGES, CheckFailed, CheckImages, LabelMismatch, check_label
from serving.deploy.config import (
    CANARY,
    STABLE,
    DeployError,
    ModelConfigFile,
    Served,
    Step,
    StepFailed,
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

HISTORY_SUFFIX = ".history.json"
CONTAINER_MODELS = Path("/models")
REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
MAX_LOG = 200  # commands kept in the history file's log


def history_path(config_path: Path) -> Path:
    return config_path.with_name(config_path.stem + HISTORY_SUFFIX)


@dataclass
class History:
    """The small state file beside the config: stable versions in order, and a log of commands and steps."""

    path: Path
    stable_history: list[int] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def read(path: Path) -> History:
        if not path.exists():
            return History(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DeployError(f"cannot read the deploy history {path}: {exc}") from exc
        return History(path, [int(v) for v in data.get("stable_history", [])], list(data.get("log", [])))

    def write(self) -> None:
        data = {"stable_history": self.stable_history, "log": self.log[-MAX_LOG:]}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")

    def sync_with(self, served: Served) -> None:
        """Adopt a stable set by hand (or before this tool was used) as the latest history entry."""
        stable = served.label(STABLE)
        if stable is not None and (not self.stable_history or self.stable_history[-1] != stable):
            self.stable_history.append(stable)


@dataclass
class Options:
    config: Path
    model_server: str
    apply: str = "reload"  # reload | poll
    models_dir: Path | None = None
    timeout: float = 120.0  # seconds per step (load, reload, poll)
    check_images: Path = CHECK_IMAGES
    min_accuracy: float = 0.0
    on_write: str | None = None  # shell command run after each write (poll mode: publish the file)
    check: bool = True


class Deployer:
    def __init__(self, options: Options, *, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.client = ModelServerClient(options.model_server, timeout=min(30.0, options.timeout))
        self._images: CheckImages | None = None

    def close(self) -> None:
        self.client.close()

    # ---- reading the current state ----

    def _config(self) -> ModelConfigFile:
        return ModelConfigFile.read(self.options.config)

    def models_dir(self, config: ModelConfigFile) -> Path | None:
        if self.options.models_dir is not None:
            return self.options.models_dir
        base = Path(config.base_path)
        if base.is_dir():
            return base
        # The shared config names the container path /models/cifar10; on the host it is the repository's
        # models/ folder (as `python -m serving.modelserver.launch` maps it).
        in_repo = self.options.config.resolve().is_relative_to(REPO_MODELS.parent)
        if in_repo and base.is_relative_to(CONTAINER_MODELS):
            mapped = REPO_MODELS / base.relative_to(CONTAINER_MODELS)
            return mapped if mapped.is_dir() else None
        return None

    def served_by_config(self, config: ModelConfigFile, disk: list[int] | None) -> Served:
        """What the config asks for. A `latest`/`all` policy with the disk out of sight (a cluster volume) is
        resolved by what the server has loaded, which is what the policy chose."""
        if disk is None and config.entry.model_version_policy.WhichOneof("policy_choice") != "specific":
            try:
                disk = [s.version for s in self.client.model_status() if s.state == "AVAILABLE"]
            except ModelServerError as exc:
                raise DeployError(f"cannot resolve the config's version policy: {exc.message}") from exc
        return config.served(disk)

    def on_disk(self, config: ModelConfigFile) -> list[int] | None:
        folder = self.models_dir(config)
        return versions_on_disk(folder) if folder is not None else None

    def status(self) -> dict[str, Any]:
        config = self._config()
        disk = self.on_disk(config)
        try:
            served = self.served_by_config(config, disk)
        except DeployError:
            served = config.served([])
        history = History.read(history_path(self.options.config))
        try:
            states = {s.version: s for s in self.client.model_status()}
            server_error = None
        except ModelServerError as exc:
            states, server_error = {}, exc.message
        versions = sorted(set(states) | set(served.versions) | set(disk or []))
        rows = []
        for v in versions:
            s = states.get(v)
            rows.append({
                "version": v,
                "state": s.state if s else None,
                "error": s.error_message if s and s.error_code != "OK" else None,
                "configured": v in served.versions,
                "labels": sorted(k for k, t in served.labels if t == v),
                "on_disk": None if disk is None else v in disk,
            })
        return {
            "config": str(self.options.config),
            "model_server": self.options.model_server,
            "server_error": server_error,
            "stable": served.label(STABLE),
            "canary": served.label(CANARY),
            "stable_history": history.stable_history,
            "versions": rows,
        }

    # ---- commands ----

    def run(self, action: str, version: int | None = None) -> dict[str, Any]:
        """Carry out one command; returns its log record (also appended to the history file)."""
        with self._lock():
            config = self._config()
            original_text = self.options.config.read_text()
            disk = self.on_disk(config)
            current = self.served_by_config(config, disk)
            history = History.read(history_path(self.options.config))
            history.sync_with(current)
            if action == "init":
                version = version if version is not None else self._latest(disk, current)
                target = target_init(current, version)
            elif action == "canary":
                target = target_canary(current, _need(version, action), history.stable_history)
            elif action == "promote":
                target = target_promote(current)
            elif action == "rollback":
                target, _ = target_rollback(current, history.stable_history)
            elif action == "retire":
                target = target_retire(current, _need(version, action))
            else:
                raise DeployError(f"unknown action {action}")
            for v in target.versions - current.versions:
                if disk is not None and v not in disk:
                    raise DeployError(f"version {v} is not on disk under {self.models_dir(config)} (found {disk})")

            record: dict[str, Any] = {
                "action": action, "version": version, "started": time.time(),
                "before": _describe(current), "target": _describe(target), "steps": [], "ok": False,
            }
            self.say(f"{action}: {current.describe()}  ->  {target.describe()}")
            steps = plan(current, target)
            self._served_now = current
            done: Step | None = None
            try:
                for step in steps:
                    record["steps"].append(self._step(config, step))
                    done = step
                if not steps:  # nothing to change: still prove the labels answer
                    record["checks"] = self._check_labels(current)
                record["ok"] = True
                self._update_history(history, action, current, target)
            except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - whatever broke a step, undo it
                record["error"] = _message(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted"
                self.say(f"FAILED: {record['error']}; restoring {current.describe()}")
                # Whatever the server applied, the failing step's state is the most it can be serving now.
                if len(record["steps"]) < len(steps):
                    failed_state = steps[len(record["steps"])].served
                else:
                    failed_state = done.served if done else current
                record["restore"] = self._restore(config, failed_state, current, original_text)
            record["finished"] = time.time()
            history.log.append(record)
            history.write()
            if not record["ok"]:
                undone = record["restore"].get("ok", False)
                raise StepFailed(f"{action} failed and " + ("was undone" if undone else
                                 f"the undo failed too ({record['restore'].get('error')})")
                                 + f": {record['error']}", undone)
            self.say(f"{action}: done ({record['finished'] - record['started']:.1f} s)")
            return record

    # ---- steps ----

    def _step(self, config: ModelConfigFile, step: Step) -> dict[str, Any]:
        self.say(f"  {step.name}: {step.served.describe()}")
        info: dict[str, Any] = {"name": step.name, **_describe(step.served), "started": time.time()}
        dropped = self._served_now.versions - step.served.versions
        stale = self._failed_loads()
        self._write_and_apply(config, step.served)
        info["applied"] = time.time()
        self._wait_versions(step.served, dropped=dropped, stale=stale)
        info["checks"] = self._check_labels(step.served, wait=self.options.apply == "poll")
        if self.options.apply == "poll":
            # The server re-read the file at some instant before its labels answered as asked.
            info["applied"] = time.time()
        info["finished"] = time.time()
        return info

    def _write_and_apply(self, config: ModelConfigFile, served: Served) -> None:
        new_config = config.with_served(served)
        previous_text = self.options.config.read_text()
        write_atomic(self.options.config, config_text(new_config))
        try:
            if self.options.on_write:
                subprocess.run(self.options.on_write, shell=True, check=True, timeout=self.options.timeout)
            if self.options.apply == "reload":
                self.client.reload_config(new_config, timeout=self.options.timeout)
        except BaseException:
            # The server refused this config: the file must not keep asking for it.
            write_atomic(self.options.config, previous_text)
            raise
        self._served_now = served

    def _failed_loads(self) -> dict[int, str]:
        """Versions whose last load failed, before a step: seen again unchanged, that is old news."""
        try:
            return {s.version: s.error_message for s in self.client.model_status()
                    if s.state == "END" and s.error_code != "OK"}
        except ModelServerError:
            return {}

    def _wait_versions(self, served: Served, *, dropped: frozenset[int] = frozenset(),
                       wanted: frozenset[int] | None = None, stale: dict[int, str] | None = None) -> None:
        wanted = served.versions if wanted is None else wanted
        stale = stale or {}
        deadline = time.monotonic() + self.options.timeout
        while True:
            states = {s.version: s for s in self.client.model_status()}
            for v in wanted:
                s = states.get(v)
                if s is not None and s.state == "END" and s.error_code != "OK" and stale.get(v) != s.error_message:
                    raise DeployError(f"version {v} failed to load: {s.error_code} {s.error_message}")
            missing = [v for v in sorted(wanted) if v not in states or states[v].state != "AVAILABLE"]
            lingering = [v for v in sorted(dropped) if v in states and states[v].state == "AVAILABLE"]
            if not missing and not lingering:
                return
            if time.monotonic() > deadline:
                raise DeployError(
                    f"timed out after {self.options.timeout:.0f} s: not AVAILABLE {missing}, still loaded {lingering} "
                    f"(states: { {v: s.state for v, s in states.items()} })"
                )
            time.sleep(0.1)

    _served_now: Served = Served.of(set())

    def _images_for_check(self) -> CheckImages:
        if self._images is None:
            self._images = CheckImages.load(self.options.check_images)
        return self._images

    def _check_labels(self, served: Served, *, wait: bool = False) -> list[dict[str, Any]]:
        results = []
        images = self._images_for_check()
        deadline = time.monotonic() + self.options.timeout
        for label, version in served.labels:
            while True:
                try:
                    if self.options.check:
                        result = check_label(self.client, label, version, images,
                                             min_accuracy=self.options.min_accuracy)
                        results.append(result.as_dict())
                        self.say(f"    {label} -> {version}: ok (accuracy {result.accuracy:.2f} on "
                                 f"{len(images.names)} check images)")
                    else:  # only that the label answers from the right version
                        got = self.client.predict_pixels(images.pixels[:1], label=label).version
                        if got != version:
                            raise LabelMismatch(label, version, got)
                    break
                except (LabelMismatch, ModelServerError) as exc:
                    # Polling: the server may not have re-read the file yet. Reload: a mismatch is a failure.
                    if not wait or time.monotonic() > deadline:
                        raise CheckFailed(_message(exc)) from exc
                    time.sleep(0.2)
        return results

    def _restore(self, config: ModelConfigFile, from_state: Served, to_state: Served,
                 original_text: str) -> dict[str, Any]:
        out: dict[str, Any] = {"started": time.time(), "steps": []}
        try:
            for step in plan(from_state, to_state):
                self.say(f"  undo {step.name}: {step.served.describe()}")
                info = {"name": step.name, **_describe(step.served), "started": time.time()}
                self._write_and_apply(config, step.served)
                info["applied"] = time.time()
                # Wait only for what was good before: a broken new version may never load.
                self._wait_versions(step.served, wanted=step.served.versions & to_state.versions)
                out["steps"].append(info)
            write_atomic(self.options.config, original_text)  # the old file byte for byte (it asks for to_state)
            out["ok"] = True
        except Exception as exc:  # noqa: BLE001 - report the undo failure beside the original one
            out["ok"] = False
            out["error"] = _message(exc)
            self.say(f"UNDO FAILED: {out['error']}: check `status` and fix {self.options.config} by hand")
        out["finished"] = time.time()
        return out

    def _update_history(self, history: History, action: str, current: Served, target: Served) -> None:
        if action in ("init", "promote"):
            history.sync_with(target)
        elif action == "rollback":
            back = target.label(STABLE)
            while history.stable_history and history.stable_history[-1] != back:
                history.stable_history.pop()
            history.sync_with(target)

    def _latest(self, disk: list[int] | None, current: Served) -> int:
        candidates = disk or sorted(current.versions)
        if not candidates:
            raise DeployError("no version on disk or in the config: give one")
        return max(candidates)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One deploy command at a time per config file."""
        lock_path = self.options.config.with_name("." + self.options.config.name + ".lock")
        with open(lock_path, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeployError(f"another deploy command holds {lock_path}") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _need(version: int | None, action: str) -> int:
    if version is None:
        raise DeployError(f"{action} needs a VERSION")
    return version


def _describe(served: Served) -> dict[str, Any]:
    return {"versions": sorted(served.versions), "labels": served.label_map}


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__
