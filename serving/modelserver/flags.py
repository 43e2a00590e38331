"""tensorflow_model_server's command-line flags (same names, defaults and meanings)."""

from __future__ import annotations

import argparse
import os


def _bool(v: str) -> bool:
    low = v.lower()
    if low in ("1", "true", "yes", "t"):
        return True
    if low in ("0", "false", "no", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


# Real tensorflow_model_server flags that have no effect on this CPU-only server; accepted so that the same
# command line works for both servers.
IGNORED = [
    "grpc_channel_arguments", "grpc_max_threads", "rest_api_num_threads", "platform_config_file",
    "ssl_config_file", "grpc_socket_path", "saved_model_tags", "per_process_gpu_memory_fraction",
    "flush_filesystem_caches", "enable_signature_method_name_check", "xla_cpu_compilation_enabled",
    "rest_api_enable_cors_support", "enable_profiler", "num_unload_threads", "thread_pool_factory_config_file",
    "mixed_precision", "skip_initialize_tpu", "remove_unused_fields_from_bundle_metagraph",
    "prefer_tflite_model", "num_tflite_pools", "num_tflite_interpreters_per_pool", "use_tflite_model",
    "tensorflow_session_parallelism", "tensorflow_session_config_file", "use_alts_credentials",
    "enable_grpc_health_check_service_for_rest", "model_config_file_poll_wait_seconds_for_batching",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.modelserver",
        description="Embedded TensorFlow Serving-compatible model server (flags as tensorflow_model_server).",
        allow_abbrev=False,
    )
    a = p.add_argument
    a("--port", type=int, default=8500, help="gRPC port; 0 disables gRPC")
    a("--rest_api_port", type=int, default=0, help="REST port; 0 disables REST")
    a("--rest_api_timeout_in_ms", type=int, default=30000)
    a("--model_name", default="default")
    a("--model_base_path", default="")
    a("--model_config_file", default="")
    a("--model_config_file_poll_wait_seconds", type=int, default=0)
    a("--file_system_poll_wait_seconds", type=float, default=1)
    a("--enable_batching", type=_bool, nargs="?", const=True, default=False)
    a("--batching_parameters_file", default="")
    a("--monitoring_config_file", default="")
    a("--allow_version_labels_for_unavailable_models", type=_bool, nargs="?", const=True, default=False)
    a("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True)
    a("--num_request_iterations_for_warmup", type=int, default=1)
    a("--enable_grpc_healthcheck_service", type=_bool, nargs="?", const=True, default=False)
    a("--max_num_load_retries", type=int, default=5)
    a("--load_retry_interval_micros", type=int, default=60 * 1000 * 1000)
    a("--num_load_threads", type=int, default=0, help="0: 2 threads")
    a("--tensorflow_intra_op_parallelism", type=int, default=0)
    a("--tensorflow_inter_op_parallelism", type=int, default=0)
    a("--version", type=_bool, nargs="?", const=True, default=False)
    # Not in tensorflow_model_server: where to listen (the real server binds all interfaces).
    a("--bind_address", default=os.environ.get("MODELSERVER_BIND_ADDRESS", "0.0.0.0"),
      help="address both ports bind (embedded server only; default all interfaces as TF Serving)")
    a("--model_base_path_rewrite", action="append", default=[], metavar="FROM=TO",
      help="rewrite a base-path prefix of the model config, e.g. /models=./models (embedded server only)")
    for name in IGNORED:
        a(f"--{name}", default=None, nargs="?", const="true", help=argparse.SUPPRESS)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)
