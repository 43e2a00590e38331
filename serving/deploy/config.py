"""The model config file and the transitions between served states, as pure functions (no server involved).

A served state is the set of loaded versions plus the version labels. Every deploy command names a target state;
`plan` turns "current -> target" into the steps TF Serving accepts, because a label may only point at a version
that is already loaded and available:

1. load: serve the union of current and target versions, labels unchanged;
2. relabel: move the labels (everything they point at is loaded by now);
3. unload: drop the versions the target no longer serves (after the labels left them).

Steps that change nothing are left out, so a pure label move is one step and `canary` is load + relabel.
Conventions of this project: `stable` is what production traffic uses; `canary` always exists (at rest it equals
`stable`) so that clients routing a share of traffic through it never hit "Unrecognized servable version label".
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from client.contract import MODEL_NAME
from client.protos.tensorflow_serving.config import model_server_config_pb2

STABLE = "stable"
CANARY = "canary"

HEADER = (
    "# TensorFlow Serving ModelServerConfig (text format).\n"
    "# Managed by `python -m serving.deploy`: it rewrites this file atomically at each step and keeps the history\n"
    "# of stable versions in the .history.json file beside it. Edits by hand are fine between deploy commands.\n"
)


class DeployError(Exception):
    """A command that cannot be carried out (bad precondition, invalid config, failed step)."""


class StepFailed(DeployError):
    """A step was tried and failed; the previous config was restored (`undone`) or not."""

    def __init__(self, message: str, undone: bool) -> None:
        super().__init__(message)
        self.undone = undone


@dataclass(frozen=True)
class Served:
    """What the model server should serve for one model: loaded versions and labels."""

    versions: frozenset[int]
    labels: tuple[tuple[str, int], ...] = ()  # sorted (label, version) pairs, hashable

    @staticmethod
    def of(versions: set[int] | frozenset[int] | list[int], labels: dict[str, int] | None = None) -> Served:
        return Served(frozenset(versions), tuple(sorted((labels or {}).items())))

    @property
    def label_map(self) -> dict[str, int]:
        return dict(self.labels)

    def label(self, name: str) -> int | None:
        return self.label_map.get(name)

    def describe(self) -> str:
        labels = ", ".join(f"{k}={v}" for k, v in self.labels) or "no labels"
        return f"versions {sorted(self.versions)}; {labels}"


@dataclass(frozen=True)
class Step:
    name: str  # load | relabel | unload
    served: Served


@dataclass
class ModelConfigFile:
    """A parsed model config file and the entry of the model being deployed."""

    path: Path
    config: model_server_config_pb2.ModelServerConfig
    model_name: str = MODEL_NAME
    _index: int = field(default=-1, repr=False)

    @staticmethod
    def read(path: str | os.PathLike, model_name: str = MODEL_NAME) -> ModelConfigFile:
        path = Path(path)
        try:
            config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
        except (OSError, text_format.ParseError) as exc:
            raise DeployError(f"cannot read the model config {path}: {exc}") from exc
        entries = [i for i, c in enumerate(config.model_config_list.config) if c.name == model_name]
        if len(entries) != 1:
            raise DeployError(f"{path} must list model {model_name!r} exactly once (found {len(entries)})")
        return ModelConfigFile(path, config, model_name, entries[0])

    @property
    def entry(self) -> model_server_config_pb2.ModelConfig:
        return self.config.model_config_list.config[self._index]

    @property
    def base_path(self) -> str:
        return self.entry.base_path

    def served(self, on_disk: list[int] | None = None) -> Served:
        """The served state the file asks for. `latest`/`all` policies need the versions on disk to be resolved."""
        policy = self.entry.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        labels = dict(self.entry.version_labels)
        if choice == "specific":
            return Served.of(set(policy.specific.versions), labels)
        if on_disk is None:
            raise DeployError(
                f"{self.path} serves {choice or 'latest'} versions: give --models-dir so the versions on disk are known"
            )
        if choice == "all":
            return Served.of(set(on_disk), labels)
        count = policy.latest.num_versions or 1  # TF Serving's default policy is latest { num_versions: 1 }
        return Served.of(set(sorted(on_disk)[-count:]), labels)

    def with_served(self, served: Served) -> model_server_config_pb2.ModelServerConfig:
        """A copy of the whole config with this model's versions and labels replaced; all else is kept."""
        config = model_server_config_pb2.ModelServerConfig()
        config.CopyFrom(self.config)
        entry = config.model_config_list.config[self._index]
        entry.model_version_policy.Clear()
        entry.model_version_policy.specific.versions.extend(sorted(served.versions))
        entry.ClearField("version_labels")
        for label, version in served.labels:
            entry.version_labels[label] = version
        return config


def config_text(config: model_server_config_pb2.ModelServerConfig) -> str:
    return HEADER + text_format.MessageToString(config)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write beside the target then rename: a polling model server never reads half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the model server may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions_on_disk(base_path: str | os.PathLike) -> list[int]:
    """Integer-named version folders with a saved_model.pb, as TF Serving sees them (others are skipped)."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        if child.name.isdigit() and (child / "saved_model.pb").is_file():
            found.append(int(child.name))
    return sorted(found)


# ---- planning ------------------------------------------------------------------------------------------------


def plan(current: Served, target: Served) -> list[Step]:
    """The load / relabel / unload steps from `current` to `target` (see the module doc)."""
    for label, version in target.labels:
        if version not in target.versions:
            raise DeployError(f"label {label} would point at version {version}, which the target does not serve")
    steps: list[Step] = []
    union = current.versions | target.versions
    # Labels of the current state that point at versions the target drops stay valid until the unload step.
    if union != current.versions:
        steps.append(Step("load", Served(union, current.labels)))
    if target.labels != current.labels:
        steps.append(Step("relabel", Served(union, target.labels)))
    if union != target.versions:
        steps.append(Step("unload", target))
    return steps


def _require_stable(current: Served) -> int:
    stable = current.label(STABLE)
    if stable is None:
        raise DeployError("the config has no 'stable' label yet: run `init [VERSION]` first")
    return stable


def target_init(current: Served, version: int) -> Served:
    """Serve exactly `version`, as stable and canary (bootstrap, or a reset)."""
    return Served.of({version}, {STABLE: version, CANARY: version})


def target_canary(current: Served, version: int, stable_history: list[int]) -> Served:
    """Serve `version` beside stable under the canary label; a replaced canary is unloaded unless it is a
    previous stable (kept loaded so that rollback needs no load)."""
    stable = _require_stable(current)
    if version == stable:
        raise DeployError(f"version {version} is already stable")
    versions = set(current.versions) | {version}
    old = current.label(CANARY)
    if old is not None and old not in (stable, version) and old not in stable_history:
        versions.discard(old)
    labels = current.label_map | {CANARY: version}
    return Served.of(versions, labels)


def target_promote(current: Served) -> Served:
    """Move stable to the canary. The old stable stays loaded (instant rollback) until retired."""
    stable = _require_stable(current)
    canary = current.label(CANARY)
    if canary is None or canary == stable:
        raise DeployError("there is no canary to promote (canary == stable); run `canary VERSION` first")
    return Served.of(current.versions | {stable, canary}, current.label_map | {STABLE: canary, CANARY: canary})


def target_rollback(current: Served, stable_history: list[int]) -> tuple[Served, int]:
    """Stable (and canary) back to the previous stable; the version rolled back from stays loaded until retired."""
    stable = _require_stable(current)
    previous = [v for v in stable_history if v != stable]
    if not previous:
        raise DeployError(f"no previous stable version is recorded before {stable}: nothing to roll back to")
    back = previous[-1]
    return Served.of(current.versions | {back}, current.label_map | {STABLE: back, CANARY: back}), back


def target_retire(current: Served, version: int) -> Served:
    """Stop serving `version`; a canary on it first falls back to stable. Stable itself cannot be retired."""
    stable = _require_stable(current)
    if version == stable:
        raise DeployError(f"version {version} is stable: promote or roll back to another version first")
    if version not in current.versions:
        raise DeployError(f"version {version} is not served (served: {sorted(current.versions)})")
    labels = {k: (stable if v == version else v) for k, v in current.label_map.items()}
    return Served.of(current.versions - {version}, labels)
