"""The embedded model server process: flags → config → version manager → gRPC + REST on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from client.protos.tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
from client.protos.tensorflow_serving.config import model_server_config_pb2
from serving.modelserver import flags
from serving.modelserver.batching import Batcher
from serving.modelserver.config import (
    ConfigError,
    parse_batching,
    parse_model_config_text,
    parse_monitoring,
    read_model_config,
    single_model_config,
)
from serving.modelserver.core import Core
from serving.modelserver.errors import ServingError
from serving.modelserver.grpc_api import ModelService, PredictionService
from serving.modelserver.manager import Manager, ManagerOptions
from serving.modelserver.metrics import Metrics
from serving.modelserver.rest_api import RestApp

log = logging.getLogger("modelserver")
VERSION = "2.21.0-embedded"
GRPC_MAX_MESSAGE = 2**31 - 1  # TF Serving accepts messages up to 2 GiB
SHUTDOWN_GRACE_S = 30.0


def build_config(args: object) -> model_server_config_pb2.ModelServerConfig:
    if args.model_config_file:
        cfg = read_model_config(args.model_config_file)
    elif args.model_base_path:
        # TF Serving insists on an absolute path; relative ones are taken from the working directory here.
        cfg = single_model_config(args.model_name, os.path.abspath(args.model_base_path)
                                  if "://" not in args.model_base_path else args.model_base_path)
    else:
        raise ConfigError("Both server_options.model_base_path and server_options.model_config_file are empty!")
    return cfg


class _Uvicorn:
    """uvicorn without its own signal handling: this process decides when to drain."""

    @staticmethod
    def make(app: RestApp, host: str, port: int) -> object:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # noqa: ANN202
                yield

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", http="h11", ws="none", timeout_keep_alive=30,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        return Server(config)


async def serve(args: object, manager: Manager, core: Core, monitoring_path: str | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    grpc_server = None
    health = None
    if args.port:
        grpc_server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), grpc_server)
        if args.enable_grpc_healthcheck_service:
            from grpc_health.v1 import health as health_mod
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_mod.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
            for service in ("", "ModelService", "PredictionService", "tensorflow.serving.ModelService",
                            "tensorflow.serving.PredictionService"):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        address = f"{args.bind_address}:{args.port}"
        try:
            bound = grpc_server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound == 0:
            log.error("Failed to bind gRPC server to %s", address)
            return 1
        await grpc_server.start()
        log.info("Running gRPC ModelServer at %s ...", address)

    rest_server = rest_task = None
    if args.rest_api_port:
        rest_server = _Uvicorn.make(RestApp(core, args.rest_api_timeout_in_ms, monitoring_path),
                                    args.bind_address, args.rest_api_port)
        rest_task = asyncio.create_task(rest_server.serve())
        while not rest_server.started:
            if rest_task.done():
                log.error("Failed to start HTTP server on port %d", args.rest_api_port)
                if grpc_server is not None:
                    await grpc_server.stop(0)
                return 1
            await asyncio.sleep(0.01)
        log.info("Exporting HTTP/REST API at:%s:%d ...", args.bind_address, args.rest_api_port)

    poller = None
    if args.model_config_file and args.model_config_file_poll_wait_seconds > 0:
        poller = asyncio.create_task(poll_config_file(args, manager))

    await stop.wait()
    log.info("Shutting down: no new requests; finishing the ones in flight")
    if health is not None:
        await health.enter_graceful_shutdown()
    if poller is not None:
        poller.cancel()
    waits = []
    if grpc_server is not None:
        waits.append(grpc_server.stop(SHUTDOWN_GRACE_S))
    if rest_server is not None:
        rest_server.should_exit = True
        waits.append(rest_task)
    await asyncio.gather(*waits, return_exceptions=True)
    return 0


async def poll_config_file(args: object, manager: Manager) -> None:
    last = Path(args.model_config_file).read_text()
    while True:
        await asyncio.sleep(args.model_config_file_poll_wait_seconds)
        try:
            text = Path(args.model_config_file).read_text()
            if text == last:
                continue
            last = text
            cfg = parse_model_config_text(text, f"model config file {args.model_config_file}")
            await asyncio.to_thread(manager.reload, cfg)
            log.info("Reloaded model config from %s", args.model_config_file)
        except (ConfigError, ServingError, OSError) as exc:
            log.error("Failed to reload model config %s: %s", args.model_config_file, exc)


def main(argv: list[str] | None = None) -> int:
    args = flags.parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(levelname).1s %(name)s] %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    if args.version:
        print(f"TensorFlow ModelServer: {VERSION}\nTensorFlow Library: embedded")
        return 0
    for name in flags.IGNORED:
        if getattr(args, name) is not None:
            log.warning("--%s has no effect in the embedded model server", name)
    try:
        if args.port and args.port == args.rest_api_port:
            raise ConfigError("server_options.grpc_port and server_options.http_port cannot be the same")
        if args.batching_parameters_file and not args.enable_batching:
            raise ConfigError("--batching_parameters_file requires --enable_batching")
        batching = parse_batching(args.batching_parameters_file) if args.enable_batching else None
        monitoring = parse_monitoring(args.monitoring_config_file)
        cfg = build_config(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 1

    import tensorflow as tf  # only now: flag errors answer without the TF import's seconds

    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)

    metrics = Metrics()
    manager = Manager(ManagerOptions(
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_s=args.load_retry_interval_micros / 1e6,
        enable_model_warmup=args.enable_model_warmup,
        num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        num_load_threads=args.num_load_threads or 2,
        base_path_rewrites=tuple(args.model_base_path_rewrite),
    ), metrics)
    batcher = Batcher(batching, metrics.observe_batch) if batching is not None else None
    core = Core(manager, metrics, batcher, workers=max(4, os.cpu_count() or 1))
    try:
        manager.reload(cfg)
    except (ServingError, ConfigError) as exc:
        log.error("Loading the model config failed: %s", exc)
        manager.stop()
        return 1
    manager.start_polling()
    profile = os.environ.get("MODELSERVER_PROFILE")  # debugging aid: cProfile of the event loop thread
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        rc = asyncio.run(serve(args, manager, core,
                               monitoring.path if monitoring.prometheus_enabled else None))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        manager.stop()
        core.shutdown()
    log.info("Model server stopped")
    # TF's own threads can keep the interpreter alive; the drain is done, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
