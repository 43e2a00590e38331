"""The gateway + model server at one concurrency under different settings, and where the CPU goes.

Each setting is NBT,CALLS,INTRA: the model server's num_batch_threads, the gateway's GATEWAY_MODEL_CONCURRENCY
(Predict calls in flight) and --tensorflow_intra_op_parallelism (0: TensorFlow's default, one per core). For each,
a fresh model server and gateway are started and loaded by closed-loop clients posting one 32x32 PNG each (as in
bench_serving.py); reported: images/s, p50/p99, and the CPU each process used per image (from /proc).

    python bench/bench_serving_settings.py 2,2,0 2,2,1 2,4,0 1,2,0 [--clients 32] [--seconds 6] [--model-base ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from bench_serving import (
    ROOT,
    free_port,
    http_load,
    multipart,
    png_bytes,
    start,
    stop,
    summarise,
    test_images,
    wait_http,
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="NBT,CALLS,INTRA")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--model-base", type=Path, default=ROOT / "models" / "cifar10")
    args = parser.parse_args()

    pngs = [png_bytes(img) for img in test_images(256)[0]]
    logs = Path(os.environ.get("BENCH_LOGS", "/tmp")) / f"bench-serving-settings-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{args.clients} clients, {args.seconds:.0f} s each; logs {logs}")
    print("| model server batch threads | gateway calls in flight | intra-op threads | images/s | p50 / p99 ms "
          "| gateway CPU ms/image | model server CPU ms/image |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        nbt, calls, intra = (int(v) for v in setting.split(","))
        batching = logs / f"batching-{nbt}.config"
        batching.write_text(f"max_batch_size {{ value: 64 }}\nbatch_timeout_micros {{ value: 0 }}\n"
                            f"max_enqueued_batches {{ value: 64 }}\nnum_batch_threads {{ value: {nbt} }}\n")
        grpc_port, rest_port, port = free_port(), free_port(), free_port()
        server = start([sys.executable, "-m", "serving.modelserver", f"--port={grpc_port}",
                        f"--rest_api_port={rest_port}", "--model_name=cifar10",
                        f"--model_base_path={args.model_base.resolve()}", "--enable_batching=true",
                        f"--batching_parameters_file={batching}"]
                       + ([f"--tensorflow_intra_op_parallelism={intra}"] if intra else []), logs / "modelserver.log")
        gateway = start([sys.executable, "-m", "serving.gateway"], logs / "gateway.log", {
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "GATEWAY_MODEL_SERVER": f"127.0.0.1:{grpc_port}",
            "GATEWAY_MODEL_CONCURRENCY": str(calls)})
        try:
            wait_http(rest_port, server, "/v1/models/cifar10")
            wait_http(port, gateway, "/healthz")
            requests = [multipart(p, port) for p in pngs]
            asyncio.run(http_load(port, requests, args.clients, 1.0))  # warm-up
            before = {p.pid: cpu_seconds(p.pid) for p in (gateway, server)}
            record, errors = asyncio.run(http_load(port, requests, args.clients, args.seconds))
            used = {p.pid: cpu_seconds(p.pid) - before[p.pid] for p in (gateway, server)}
            got = summarise(record, errors, args.seconds)
            n = max(got["requests"], 1)
            print(f"| {nbt} | {calls} | {intra or 'default'} | {got['images_per_s']:.0f} | {got['p50_ms']:.1f} / "
                  f"{got['p99_ms']:.1f} | {1000 * used[gateway.pid] / n:.2f} | {1000 * used[server.pid] / n:.2f} |",
                  flush=True)
        finally:
            stop(gateway)
            stop(server)


if __name__ == "__main__":
    main()
