"""Embedded model server vs the same SavedModel in-process, side by side in one run (issue 3, item 6).

    nice -n 10 python bench/bench_modelserver.py --model-base-path models/cifar10 [--write-docs]

In-process: the SavedModel's serving_default called directly at batch 1 (latency) and batch 64 (images/s).
Server: `python -m serving.modelserver` with serving/config/batching.config, driven over gRPC by 1/8/32/64
concurrent clients (grpc.aio, one channel, one image per request). Targets: 64 clients reach >= 70 % of the
in-process batch-64 images/s; at 1 client the p50 latency is <= 2 ms above the in-process single-image p50.
--write-docs puts the table into docs/modelserver.md between the BENCH markers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serving import latest_version  # noqa: E402 - beside this file

from tests.modelserver_helpers import predict_request, start_server  # noqa: E402

DOC = ROOT / "docs" / "modelserver.md"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class InProcess:
    """The SavedModel's serving_default called directly, as a client embedding TF would."""

    def __init__(self, version_dir: Path) -> None:
        import tensorflow as tf

        self.tf = tf
        self.fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
        rng = np.random.default_rng(0)
        self.one = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        self.b64 = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
        for _ in range(20):
            self.call(self.one)
        for _ in range(3):
            self.call(self.b64)

    def call(self, x: np.ndarray) -> None:
        out = self.fn(images=self.tf.constant(x))
        {k: v.numpy() for k, v in out.items()}

    def latency(self, seconds: float) -> dict:
        lat = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            self.call(self.one)
            lat.append((time.perf_counter() - t) * 1e3)
        return {"ips": 1e3 / statistics.mean(lat), "p50": pct(lat, 50), "p99": pct(lat, 99)}

    def throughput(self, seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() < t0 + seconds:
            self.call(self.b64)
            n += 64
        return n / (time.perf_counter() - t0)


async def drive(port: int, clients: int, seconds: float) -> dict:
    import grpc

    from client.protos.tensorflow_serving.apis import prediction_service_pb2_grpc

    rng = np.random.default_rng(1)
    requests = [predict_request(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)) for _ in range(16)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        lat: list[float] = []
        errors = 0
        stop_at = 0.0
        measuring = False

        async def client(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await stub.Predict(requests[k % 16], timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                if measuring:
                    lat.append((time.perf_counter() - t) * 1e3)
                k += 1

        # warm-up second, then the measured window
        stop_at = time.perf_counter() + 1.0
        await asyncio.gather(*(client(i) for i in range(clients)))
        measuring = True
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "ips": len(lat) / elapsed, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "errors": errors}


def batch_stats(rest: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{rest}/monitoring/prometheus/metrics", timeout=10).text
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(":tensorflow:serving:batching_session:processed_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
        if line.startswith(":tensorflow:serving:batching_session:processed_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-base-path", type=Path, default=ROOT / "models" / "cifar10")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per level")
    ap.add_argument("--clients", default="1,8,32,64")
    ap.add_argument("--batching-config", type=Path, default=ROOT / "serving" / "config" / "batching.config")
    ap.add_argument("--rounds", type=int, default=3, help="paired in-process/server rounds for the targets")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--conditions", default="", help="free text on the machine's load, for the docs")
    args = ap.parse_args()
    base = args.model_base_path.resolve()
    version = latest_version(base)
    meta = version / "metadata.json"
    model_desc = f"{base.name} version {version.name}"
    if meta.exists():
        import json
        m = json.loads(meta.read_text())
        model_desc += f" ({m.get('architecture', '?')}, depth {m.get('depth', '?')})"

    print(f"model: {model_desc}", flush=True)
    local = InProcess(version)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), "--enable_batching", f"--batching_parameters_file={args.batching_config}",
                              f"--monitoring_config_file={ROOT / 'serving/config/monitoring.config'}",
                              model_base=base)
        try:
            def level(clients: int) -> dict:
                before = batch_stats(server.rest)
                row = asyncio.run(drive(server.grpc_port, clients, args.seconds))
                after = batch_stats(server.rest)
                calls = after[0] - before[0]
                row["mean_batch"] = (after[1] - before[1]) / calls if calls else float("nan")
                return row

            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(level(clients))
                r = rows[-1]
                print(f"  {clients:>3} clients: {r['ips']:7.0f} img/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms  mean batch {r['mean_batch']:5.1f}  errors {r['errors']}", flush=True)
            # The machine is shared and its load drifts, so the two targets are measured as paired rounds,
            # each in-process figure right next to its server figure, and the median of the ratios is used.
            pairs = []
            for i in range(args.rounds):
                b1 = local.latency(args.seconds)
                s1 = level(1)
                b64 = local.throughput(args.seconds)
                s64 = level(64)
                pairs.append({"b1": b1, "s1": s1, "b64": b64, "s64": s64})
                print(f"  round {i + 1}: in-process b64 {b64:6.0f} img/s vs 64 clients {s64['ips']:6.0f} "
                      f"({s64['ips'] / b64:.0%}); in-process b1 p50 {b1['p50']:.2f} ms vs 1 client "
                      f"{s1['p50']:.2f} ms ({s1['p50'] - b1['p50']:+.2f} ms)", flush=True)
        finally:
            server.stop()

    ratio = statistics.median(p["s64"]["ips"] / p["b64"] for p in pairs)
    added = statistics.median(p["s1"]["p50"] - p["b1"]["p50"] for p in pairs)
    b1 = {k: statistics.median(p["b1"][k] for p in pairs) for k in ("ips", "p50", "p99")}
    b64 = statistics.median(p["b64"] for p in pairs)
    failed = sum(r["errors"] for r in rows) + sum(p["s1"]["errors"] + p["s64"]["errors"] for p in pairs)
    load = os.getloadavg()
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {model_desc}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average {load[0]:.1f} at the end"
        + (f"; {args.conditions}" if args.conditions else "") + f". {args.seconds:g} s per measurement.",
        "",
        "| path | clients / batch | images/s | p50 ms | p99 ms | mean model batch |",
        "|---|---|---:|---:|---:|---:|",
        f"| in-process (median of rounds) | batch 1 | {b1['ips']:.0f} | {b1['p50']:.2f} | {b1['p99']:.2f} | 1 |",
        f"| in-process (median of rounds) | batch 64 | {b64:.0f} | | | 64 |",
    ]
    for r in rows:
        lines.append(f"| server gRPC | {r['clients']} clients | {r['ips']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} "
                     f"| {r['mean_batch']:.1f} |")
    lines += ["", "Paired rounds (in-process, then the server right after):", "",
              "| round | in-process b64 img/s | server 64 clients img/s | ratio | in-process b1 p50 ms "
              "| server 1 client p50 ms | added ms |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for i, p in enumerate(pairs, 1):
        lines.append(f"| {i} | {p['b64']:.0f} | {p['s64']['ips']:.0f} | {p['s64']['ips'] / p['b64']:.0%} "
                     f"| {p['b1']['p50']:.2f} | {p['s1']['p50']:.2f} | {p['s1']['p50'] - p['b1']['p50']:+.2f} |")
    lines += [
        "",
        f"- 64 clients vs in-process batch 64 (median of rounds): **{ratio:.0%}** (target >= 70 %).",
        f"- 1 client p50 minus in-process batch-1 p50 (median of rounds): **{added:+.2f} ms** (target <= 2 ms).",
        f"- failed requests: {failed}.",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write_docs and DOC.exists():
        text = DOC.read_text()
        cmd = "nice -n 10 python bench/bench_modelserver.py " + " ".join(
            a if " " not in a else repr(a) for a in sys.argv[1:])
        block = f"<!-- BENCH:START -->\nCommand: `{cmd}`\n\n{table}\n<!-- BENCH:END -->"
        text = re.sub(r"<!-- BENCH:START -->.*<!-- BENCH:END -->", lambda _: block, text, flags=re.S)
        DOC.write_text(text)
        print(f"\nwrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
