"""Model versions: what the policy aspires to, what is on disk, loading, unloading, labels, status.

Semantics of TF Serving's ServerCore with the availability-preserving policy:
- aspired versions = policy (latest N / all / specific) applied to the version folders that are ready;
- a new version is loaded before an un-aspired one is unloaded; the last available one stays until an
  aspired version is available (a broken new version therefore leaves the old one serving);
- a failed load is retried `max_num_load_retries` times, then the version ends in END with the error;
- an un-aspired version is unloaded only after its in-flight requests are done.
Beyond TF Serving: a version folder is used only when it looks complete (saved_model.pb, a finished
variables index, all data shards) and is unchanged across two polls, so a copy in progress is never loaded.
A folder that stays incomplete and unchanged for INCOMPLETE_SETTLE_S is treated as finished (and fails).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from client.protos.tensorflow_serving.config import model_server_config_pb2
from serving.modelserver import servable as servable_mod
from serving.modelserver.config import local_path, rewrite_base_paths, validate_model_config
from serving.modelserver.errors import ServingError, from_exception, invalid, not_found
from serving.modelserver.metrics import Metrics

log = logging.getLogger("modelserver")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
INCOMPLETE_SETTLE_S = float(os.environ.get("MODELSERVER_INCOMPLETE_SETTLE_S", "10"))


@dataclass
class ManagerOptions:
    file_system_poll_wait_seconds: float = 1.0
    max_num_load_retries: int = 5
    load_retry_interval_s: float = 60.0
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    allow_version_labels_for_unavailable_models: bool = False
    num_load_threads: int = 2
    base_path_rewrites: tuple[str, ...] = ()  # FROM=TO rules (embedded server only)


@dataclass
class VersionState:
    version: int
    path: Path
    state: str = START
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    servable: servable_mod.Servable | None = None
    in_flight: int = 0


@dataclass
class _Seen:
    fingerprint: tuple | None
    changed_at: float
    stable: int = 0


@dataclass
class Model:
    name: str
    base_path: str
    policy: model_server_config_pb2.ModelConfig
    versions: dict[int, VersionState] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    seen: dict[int, _Seen] = field(default_factory=dict)
    aspired: set[int] = field(default_factory=set)
    removed: bool = False
    warned_empty: bool = False


class Handle:
    """A version held for one request; release() lets an unload that waits for it proceed."""

    __slots__ = ("servable", "_state", "_lock")

    def __init__(self, state: VersionState, lock: threading.Lock) -> None:
        self.servable = state.servable
        self._state, self._lock = state, lock

    def release(self) -> None:
        with self._lock:
            self._state.in_flight -= 1


class Manager:
    def __init__(self, opts: ManagerOptions, metrics: Metrics,
                 on_unload: Callable[[servable_mod.Servable], None] | None = None) -> None:
        self.opts = opts
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max(1, opts.num_load_threads), thread_name_prefix="load")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._poller: threading.Thread | None = None
        self._on_unload = on_unload

    # --- requests ------------------------------------------------------------------------------------------

    def acquire(self, name: str, version: int | None = None, label: str | None = None) -> Handle:
        with self._lock:
            model = self.models.get(name)
            version = _labelled_version(model, version, label)
            if version is not None:
                st = model.versions.get(version) if model else None
                if st is None or st.state != AVAILABLE:
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
            else:
                ready = [v for v, s in model.versions.items() if s.state == AVAILABLE] if model else []
                if not ready:
                    raise not_found(f"Servable not found for request: Latest({name})")
                st = model.versions[max(ready)]
            st.in_flight += 1
            return Handle(st, self._lock)

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionState]:
        with self._lock:
            model = self.models.get(name)
            version = _labelled_version(model, version, label)
            if version is not None:
                st = model.versions.get(version) if model else None
                if st is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [_copy(st)]
            if model is None or not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            return [_copy(model.versions[v]) for v in sorted(model.versions, reverse=True)]

    def labels_of(self, name: str) -> dict[str, int]:
        with self._lock:
            model = self.models.get(name)
            return dict(model.labels) if model else {}

    # --- configuration -------------------------------------------------------------------------------------

    def reload(self, cfg: model_server_config_pb2.ModelServerConfig, wait_s: float = 600.0) -> None:
        """Realises exactly `cfg` (models left out are unloaded), waits for the aspired versions of its
        models to be AVAILABLE or END, then applies the version labels (TF Serving's order)."""
        if self.opts.base_path_rewrites:
            rewritten = model_server_config_pb2.ModelServerConfig()
            rewritten.CopyFrom(cfg)
            rewrite_base_paths(rewritten, self.opts.base_path_rewrites)
            cfg = rewritten
        validate_model_config(cfg)
        configs = list(cfg.model_config_list.config) if cfg.WhichOneof("config") else []
        with self._scan_lock:
            with self._lock:
                names = {c.name for c in configs}
                for name, model in self.models.items():
                    if name not in names and not model.removed:
                        model.removed = True
                        model.labels = {}
                        log.info("Model %s is no longer in the config: unloading its versions", name)
                for c in configs:
                    model = self.models.get(c.name)
                    if model is None:
                        self.models[c.name] = Model(c.name, c.base_path, c)
                    else:
                        model.removed = False
                        model.base_path, model.policy = c.base_path, c
            # Two scans a moment apart: a folder that changes in between is being written.
            self.scan_all()
            time.sleep(0.2)
            self.scan_all()
        self._wait_settled([c.name for c in configs], wait_s)
        self._apply_labels(configs)

    def _wait_settled(self, names: list[str], wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                pending = [
                    (n, v) for n in names for v in self.models[n].aspired
                    if self.models[n].versions.get(v) is None
                    or self.models[n].versions[v].state not in (AVAILABLE, END)
                ]
                left = deadline - time.monotonic()
                if not pending or left <= 0 or self._stop.is_set():
                    return
                self._changed.wait(min(left, 0.5))

    def _apply_labels(self, configs: list[model_server_config_pb2.ModelConfig]) -> None:
        with self._lock:
            new_maps = {}
            for c in configs:
                model = self.models[c.name]
                for label, version in c.version_labels.items():
                    st = model.versions.get(version)
                    available = st is not None and st.state == AVAILABLE
                    existing = model.labels.get(label)
                    may_be_unavailable = self.opts.allow_version_labels_for_unavailable_models and (
                        existing is None or existing == version)
                    if not available and not may_be_unavailable:
                        raise ServingError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"Request to assign label to version {version} of model {c.name}, which is not "
                            f"currently available for inference")
                new_maps[c.name] = dict(c.version_labels)
            for name, labels in new_maps.items():
                self.models[name].labels = labels

    # --- polling -------------------------------------------------------------------------------------------

    def start_polling(self) -> None:
        if self.opts.file_system_poll_wait_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="fs-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.opts.file_system_poll_wait_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.scan_all()
            except Exception:  # noqa: BLE001 - the poller must survive anything on disk
                log.exception("file system poll failed")

    def scan_all(self) -> None:
        with self._scan_lock:
            for model in list(self.models.values()):
                self._scan(model)
                self._evaluate(model)

    def _scan(self, model: Model) -> None:
        base = Path(local_path(model.base_path))
        present: dict[int, Path] = {}
        try:
            for entry in os.scandir(base):
                if entry.is_dir() and entry.name.isdigit():
                    present[int(entry.name)] = Path(entry.path)
        except OSError:
            pass
        if not present and not model.removed and not model.warned_empty:
            log.warning("No versions of servable %s found under base path %s", model.name, base)
            model.warned_empty = True
        elif present:
            model.warned_empty = False
        now = time.monotonic()
        ready = []
        for v, path in present.items():
            fp = servable_mod.folder_fingerprint(path)
            seen = model.seen.get(v)
            if seen is None or seen.fingerprint != fp:
                model.seen[v] = _Seen(fp, now)
                seen = model.seen[v]
            else:
                seen.stable += 1
            known = model.versions.get(v)
            if known is not None and not (known.state == END and known.error_code == grpc.StatusCode.OK):
                ready.append(v)  # decided already (loading, serving, or failed for good)
                continue
            if fp is None or seen.stable < 1:
                continue
            reason = servable_mod.incomplete_reason(path)
            if reason is None or now - seen.changed_at >= INCOMPLETE_SETTLE_S:
                ready.append(v)
        for v in list(model.seen):
            if v not in present:
                del model.seen[v]
        ready.sort()
        policy = model.policy.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        if model.removed:
            aspired: set[int] = set()
        elif kind == "all":
            aspired = set(ready)
        elif kind == "specific":
            aspired = {v for v in ready if v in set(policy.specific.versions)}
        else:
            n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
            aspired = set(ready[-n:])
        with self._lock:
            model.aspired = aspired
            for v in aspired:
                st = model.versions.get(v)
                if st is not None:
                    st.path = present[v]

    def _evaluate(self, model: Model) -> None:
        """Starts loads of aspired versions, and unloads un-aspired ones once that keeps availability."""
        with self._lock:
            for v in sorted(model.aspired):
                st = model.versions.get(v)
                path = Path(local_path(model.base_path)) / str(v)
                if st is None or (st.state == END and st.error_code == grpc.StatusCode.OK):
                    st = model.versions[v] = VersionState(v, path)
                    self._set_state(model, st, LOADING)
                    self._pool.submit(self._load, model, st)
            aspired_available = any(
                model.versions.get(v) is not None and model.versions[v].state == AVAILABLE for v in model.aspired)
            may_unload = model.removed or not model.aspired or aspired_available
            if may_unload:
                for v, st in model.versions.items():
                    if v not in model.aspired and st.state == AVAILABLE:
                        self._set_state(model, st, UNLOADING)
                        self._pool.submit(self._unload, model, st)

    def _set_state(self, model: Model, st: VersionState, state: str) -> None:
        # caller holds self._lock
        self.metrics.model_state.remove(model.name, str(st.version), st.state)
        st.state = state
        self.metrics.model_state.set(model.name, str(st.version), state, value=1)
        self._changed.notify_all()
        log.info("Model %s version %d: %s", model.name, st.version, state)

    def _load(self, model: Model, st: VersionState) -> None:
        attempts = 0
        while True:
            start = time.monotonic()
            try:
                servable = servable_mod.load(model.name, st.version, st.path, self.opts.enable_model_warmup,
                                             self.opts.num_request_iterations_for_warmup)
                self.metrics.load_attempt_count.inc(str(st.path), "success")
                self.metrics.load_latency.observe(model.name, str(st.version),
                                                  value=(time.monotonic() - start) * 1e6)
                break
            except Exception as exc:  # noqa: BLE001 - a load error is reported in the version's status
                err = _load_error(exc, st.path)
                self.metrics.load_attempt_count.inc(str(st.path), "fail")
                attempts += 1
                with self._lock:
                    still_wanted = st.version in model.aspired and not model.removed
                give_up = attempts > self.opts.max_num_load_retries or not still_wanted or self._stop.is_set()
                log.error("Loading servable version {name: %s version: %d} failed (attempt %d): %s",
                          model.name, st.version, attempts, err)
                if give_up:
                    with self._lock:
                        st.error_code, st.error_message = err.code, err.message
                        self._set_state(model, st, END)
                    return
                if self._stop.wait(self.opts.load_retry_interval_s):
                    return
        with self._lock:
            st.servable = servable
            st.error_code, st.error_message = grpc.StatusCode.OK, ""
            self._set_state(model, st, AVAILABLE)
        # Re-evaluate now, so the version this one replaces is unloaded without waiting for the next poll.
        with self._scan_lock:
            self._evaluate(model)

    def _unload(self, model: Model, st: VersionState) -> None:
        deadline = time.monotonic() + 60
        while True:
            with self._lock:
                if st.in_flight <= 0 or time.monotonic() > deadline:
                    servable, st.servable = st.servable, None
                    self._set_state(model, st, END)
                    break
            time.sleep(0.005)
        if servable is not None and self._on_unload is not None:
            self._on_unload(servable)
        log.info("Unloaded servable version {name: %s version: %d}", model.name, st.version)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _copy(st: VersionState) -> VersionState:
    return VersionState(st.version, st.path, st.state, st.error_code, st.error_message)


def _load_error(exc: BaseException, path: Path) -> ServingError:
    if isinstance(exc, DecodeError):
        return ServingError(grpc.StatusCode.DATA_LOSS, f"Can't parse {path / 'saved_model.pb'} as binary proto")
    if isinstance(exc, FileNotFoundError):
        return ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find SavedModel .pb or .pbtxt at supplied "
                                                       f"export directory path: {path}")
    return from_exception(exc)


def _labelled_version(model: object, version: int | None, label: str | None) -> int | None:
    """The version a label points to (TF Serving answers INVALID_ARGUMENT for an unknown label)."""
    if label is None:
        return version
    if model is None or label not in model.labels:
        raise invalid(f"Unrecognized servable version label: {label}")
    return model.labels[label]
