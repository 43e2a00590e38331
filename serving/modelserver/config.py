"""The three text-format configuration files: ModelServerConfig, BatchingParameters, MonitoringConfig.

ModelServerConfig comes from the vendored TF Serving protos. BatchingParameters and MonitoringConfig have no
generated Python module in any pip package, so their few fields are declared here as descriptors and parsed
with protobuf's own text-format parser: the same syntax, and an unknown field is a start-up error as in
tensorflow_model_server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from client.protos.tensorflow_serving.config import model_server_config_pb2
from serving.modelserver.errors import ServingError

DEFAULT_MONITORING_PATH = "/monitoring/prometheus/metrics"


class ConfigError(Exception):
    """A configuration file or flag combination that tensorflow_model_server would refuse at start-up."""


# --- BatchingParameters and MonitoringConfig as a private descriptor pool ------------------------------------

def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="serving_modelserver_local.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    fdp = descriptor_pb2.FieldDescriptorProto
    opt, rep = fdp.LABEL_OPTIONAL, fdp.LABEL_REPEATED

    def add(msg: descriptor_pb2.DescriptorProto, name: str, number: int, ftype: int, label: int = opt,
            type_name: str = "") -> None:
        f = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name

    # Fields of tensorflow_serving/servables/tensorflow/session_bundle_config.proto that a CPU server uses.
    b = file.message_type.add(name="BatchingParameters")
    i64, s, boolw = ".google.protobuf.Int64Value", ".google.protobuf.StringValue", ".google.protobuf.BoolValue"
    add(b, "max_batch_size", 1, fdp.TYPE_MESSAGE, type_name=i64)
    add(b, "batch_timeout_micros", 2, fdp.TYPE_MESSAGE, type_name=i64)
    add(b, "max_enqueued_batches", 3, fdp.TYPE_MESSAGE, type_name=i64)
    add(b, "num_batch_threads", 4, fdp.TYPE_MESSAGE, type_name=i64)
    add(b, "thread_pool_name", 5, fdp.TYPE_MESSAGE, type_name=s)
    add(b, "allowed_batch_sizes", 6, fdp.TYPE_INT64, rep)
    add(b, "pad_variable_length_inputs", 7, fdp.TYPE_BOOL)
    add(b, "enable_large_batch_splitting", 8, fdp.TYPE_MESSAGE, type_name=boolw)
    add(b, "max_execution_batch_size", 9, fdp.TYPE_MESSAGE, type_name=i64)
    # tensorflow_serving/config/monitoring_config.proto
    p = file.message_type.add(name="PrometheusConfig")
    add(p, "enable", 1, fdp.TYPE_BOOL)
    add(p, "path", 2, fdp.TYPE_STRING)
    m = file.message_type.add(name="MonitoringConfig")
    add(m, "prometheus_config", 1, fdp.TYPE_MESSAGE, type_name=".tensorflow.serving.PrometheusConfig")
    pool.Add(file)
    return pool


_POOL = _build_pool()
BatchingParametersProto = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
MonitoringConfigProto = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


def _parse_text(path: str, message: object, what: str) -> None:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"invalid {what} file {path}: {exc}") from exc


@dataclass(frozen=True)
class BatchingOptions:
    """BatchingParameters with TF Serving's defaults filled in."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0  # 0: max_batch_size


def parse_batching(path: str | None) -> BatchingOptions:
    if not path:
        return BatchingOptions()
    msg = BatchingParametersProto()
    _parse_text(path, msg, "batching parameters")
    d = BatchingOptions()
    opts = BatchingOptions(
        max_batch_size=msg.max_batch_size.value if msg.HasField("max_batch_size") else d.max_batch_size,
        batch_timeout_micros=(msg.batch_timeout_micros.value if msg.HasField("batch_timeout_micros")
                              else d.batch_timeout_micros),
        max_enqueued_batches=(msg.max_enqueued_batches.value if msg.HasField("max_enqueued_batches")
                              else d.max_enqueued_batches),
        num_batch_threads=msg.num_batch_threads.value if msg.HasField("num_batch_threads") else d.num_batch_threads,
        allowed_batch_sizes=tuple(msg.allowed_batch_sizes),
        pad_variable_length_inputs=msg.pad_variable_length_inputs,
        enable_large_batch_splitting=msg.enable_large_batch_splitting.value,
        max_execution_batch_size=msg.max_execution_batch_size.value,
    )
    # The checks of TF Serving's batching_util / BasicBatchScheduler.
    if opts.max_batch_size <= 0:
        raise ConfigError("max_batch_size must be positive")
    if opts.batch_timeout_micros < 0:
        raise ConfigError("batch_timeout_micros must be non-negative")
    if opts.max_enqueued_batches <= 0:
        raise ConfigError("max_enqueued_batches must be positive")
    if opts.num_batch_threads <= 0:
        raise ConfigError("num_batch_threads must be positive")
    if opts.allowed_batch_sizes:
        sizes = opts.allowed_batch_sizes
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] <= 0:
            raise ConfigError("allowed_batch_sizes entries must be monotonically increasing")
        limit = opts.max_execution_batch_size if opts.enable_large_batch_splitting and opts.max_execution_batch_size \
            else opts.max_batch_size
        if sizes[-1] != limit:
            raise ConfigError("The largest entry in batching_parameters.allowed_batch_sizes must be equal to "
                              "batching_parameters.max_batch_size")
    return opts


@dataclass(frozen=True)
class MonitoringOptions:
    prometheus_enabled: bool = False
    path: str = DEFAULT_MONITORING_PATH


def parse_monitoring(path: str | None) -> MonitoringOptions:
    if not path:
        return MonitoringOptions()
    msg = MonitoringConfigProto()
    _parse_text(path, msg, "monitoring config")
    pc = msg.prometheus_config
    return MonitoringOptions(prometheus_enabled=pc.enable, path=pc.path or DEFAULT_MONITORING_PATH)


# --- ModelServerConfig ------------------------------------------------------------------------------------

def parse_model_config_text(text: str, source: str = "model config") -> model_server_config_pb2.ModelServerConfig:
    msg = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ConfigError(f"invalid {source}: {exc}") from exc
    return msg


def read_model_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read model config file {path}: {exc}") from exc
    return parse_model_config_text(text, f"model config file {path}")


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """What --model_name/--model_base_path mean: one model, latest version, platform tensorflow."""
    cfg = model_server_config_pb2.ModelServerConfig()
    m = cfg.model_config_list.config.add(name=name, base_path=base_path, model_platform="tensorflow")
    del m  # defaults: latest { num_versions: 1 }
    return cfg


def is_absolute(base_path: str) -> bool:
    return base_path.startswith("/") or "://" in base_path


def rewrite_base_paths(cfg: model_server_config_pb2.ModelServerConfig, rules: list[str] | tuple[str, ...]) -> None:
    """--model_base_path_rewrite: applied to every config the server realises (start-up, file poll, gRPC reload)."""
    for rule in rules:
        old, sep, new = rule.partition("=")
        if not sep or not old:
            raise ConfigError(f"--model_base_path_rewrite expects FROM=TO, got {rule!r}")
        new = os.path.abspath(new)
        for m in cfg.model_config_list.config:
            if m.base_path == old or m.base_path.startswith(old.rstrip("/") + "/"):
                m.base_path = new + m.base_path[len(old.rstrip("/")):]


def validate_model_config(cfg: model_server_config_pb2.ModelServerConfig) -> None:
    """The checks ServerCore applies before realising a config; raises ServingError like its Status."""
    kind = cfg.WhichOneof("config")
    if kind != "model_config_list":
        if kind is None:
            return  # an empty config: no models
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "ServerCore::HandleReloadConfigRequest only supports reloading model_config_list configs")
    seen: set[str] = set()
    for model in cfg.model_config_list.config:
        if model.name in seen:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
        if not is_absolute(model.base_path):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Expected model {model.name} to have an absolute path or URI; "
                               f"got base_path()={model.base_path}")
        if model.base_path.startswith(("gs://", "s3://", "hdfs://")):
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               f"File system scheme of {model.base_path} is not supported by the embedded server")
        if model.model_platform not in ("", "tensorflow"):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Model {model.name} requested unsupported platform: {model.model_platform}")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 0:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Model {model.name}: latest num_versions must be non-negative")


def local_path(base_path: str) -> str:
    return base_path[len("file://"):] if base_path.startswith("file://") else base_path
