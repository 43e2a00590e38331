"""Run the whole service on one machine: the model server (real or embedded) and the gateway.

    python -m serving.run [--model-base-path models/cifar10] [--model-config-file FILE]

Starts `python -m serving.modelserver.launch` (tensorflow_model_server when it is on PATH, the embedded server
otherwise) and `python -m serving.gateway`, waits until the gateway is ready, and stops both on Ctrl-C/SIGTERM
or when either exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", default=str(ROOT / "models" / "cifar10"),
                        help="model base path (default: the shipped models/cifar10)")
    parser.add_argument("--model-config-file", help="a ModelServerConfig file instead of --model-base-path "
                        "(e.g. serving/config/models.config with its base_path pointing at your models)")
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--gateway-host", default="127.0.0.1")
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True,
                        help="server-side batching with serving/config/batching.config (default on)")
    args = parser.parse_args(argv)

    config_dir = ROOT / "serving" / "config"
    server_cmd = [sys.executable, "-m", "serving.modelserver.launch", f"--port={args.grpc_port}",
                  f"--rest_api_port={args.rest_port}",
                  f"--monitoring_config_file={config_dir / 'monitoring.config'}"]
    if args.model_config_file:
        server_cmd += [f"--model_config_file={args.model_config_file}", "--model_config_file_poll_wait_seconds=5"]
    else:
        server_cmd += ["--model_name=cifar10", f"--model_base_path={Path(args.model_base_path).resolve()}"]
    if args.batching:
        server_cmd += ["--enable_batching", f"--batching_parameters_file={config_dir / 'batching.config'}"]
    env = {**os.environ, "GATEWAY_MODEL_SERVER": f"127.0.0.1:{args.grpc_port}",
           "GATEWAY_HOST": args.gateway_host, "GATEWAY_PORT": str(args.gateway_port)}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    procs = [subprocess.Popen(server_cmd, cwd=ROOT, env=env)]
    procs.append(subprocess.Popen([sys.executable, "-m", "serving.gateway"], cwd=ROOT, env=env))

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    gateway = f"http://{args.gateway_host}:{args.gateway_port}"
    if wait_ready(f"{gateway}/readyz", procs, timeout=180):
        print(f"ready: gateway {gateway} (web page {gateway}/, API docs {gateway}/docs), "
              f"model server gRPC 127.0.0.1:{args.grpc_port}, REST 127.0.0.1:{args.rest_port}", flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in reversed(procs):  # gateway first, so no request reaches a stopped model server
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
