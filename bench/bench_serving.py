"""Serving throughput and latency, every path side by side in one run (issue 4 item 6, issue 6 item 3).

Services, each loaded by N closed-loop clients (one keep-alive connection per client, each posting one
32x32 CIFAR-10 PNG per request and waiting for the answer):
  in-process          the SavedModel's serving_default called on a batch of N decoded images in a loop, in its own
                      process: N clients batched perfectly with no transport, the ceiling of any server
  grpc direct (pixels) the model server over gRPC with the decoded pixels (serving_default)
  grpc direct (png)   the model server over gRPC with the same PNG bytes (predict_images, decoded in-graph)
  gateway             python -m serving.gateway -> the model server (gRPC, serving_default, server batching)
  naive               a FastAPI handler calling Keras model.predict per upload
  careful unbatched   the same handler calling a compiled tf.function per upload
Reports images/s, p50 and p99 latency at each concurrency, the ratios issue 4 asks for at 32 clients, the resident
memory of each process, and the best images/s as a fraction of the machine's peak FLOP/s (bench_peak.py, measured
at the start of the same run).

    python bench/bench_serving.py [--model-base models/cifar10] [--clients 1 8 32 64] [--seconds 5] [--rounds 2]
                                  [--json out.json] [--plot docs/img/serving.png]

The baselines live in this file (`--serve naive|careful|inprocess`): benchmark baselines, not product code.
"""


import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_peak import forward_flop  # noqa: E402 - beside this file

SERVICES = ("in-process", "grpc direct (pixels)", "grpc direct (png)", "gateway", "naive", "careful unbatched")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_version(model_base: Path) -> Path:
    from serving.deploy.config import versions_on_disk

    versions = versions_on_disk(model_base)
    if not versions:
        raise SystemExit(f"no version folders under {model_base}")
    return model_base / str(versions[-1])


def test_images(n: int = 256) -> tuple:
    """The first `n` CIFAR-10 test images (uint8 [n, 32, 32, 3]) and labels, from ../shared/data."""
    from training.data import load_cifar10

    test = load_cifar10(str(ROOT.parent / "shared" / "data" / "cifar-10-python.tar.gz")).test
    return test.images[:n], test.labels[:n]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


# ---- baselines ----------------------------------------------------------------------------------------------


def serve_baseline(kind: str, port: int, model_base: Path) -> None:
    """A FastAPI service classifying each upload on its own: Keras predict (naive) or a tf.function (careful)."""
    import keras
    import tensorflow as tf
    import uvicorn
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    from client.contract import CLASS_NAMES
    from training.model import build_model

    version = latest_version(model_base)
    meta = json.loads((version / "metadata.json").read_text()) if (version / "metadata.json").exists() else {}
    keras.mixed_precision.set_global_policy("float32")
    if kind == "naive":
        # Same architecture as the served version; weights do not change the cost of inference.
        model = build_model(meta.get("architecture") or "resnet_v1", meta.get("depth") or 20)
        model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)
    else:
        # The served version's own compiled graph, so the careful service runs exactly what the servers run.
        serving_default = tf.saved_model.load(str(version)).signatures["serving_default"]

        def infer(x: np.ndarray) -> np.ndarray:
            return serving_default(images=tf.constant(x))["probabilities"].numpy()

        infer(np.zeros((1, 32, 32, 3), np.uint8))  # traced and warm before the first request
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(files: list[UploadFile] = File(...)):  # noqa: B008 - FastAPI's idiom
        out = []
        for f in files:
            img = np.asarray(Image.open(f.file).convert("RGB").resize((32, 32)), dtype=np.uint8)
            if kind == "naive":
                probs = model.predict(img[None].astype(np.float32), verbose=0)[0]
            else:
                probs = infer(img[None])[0]
            top = int(probs.argmax())
            out.append({"filename": f.filename, "top": [{"class": CLASS_NAMES[top], "probability": float(probs[top])}]})
        return {"predictions": out}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_inprocess(model_base: Path) -> None:
    """Answer "N SECONDS" lines on stdin with one JSON line: serving_default on a batch of N images in a loop."""
    import tensorflow as tf

    version = latest_version(model_base)
    infer = tf.saved_model.load(str(version)).signatures["serving_default"]
    images, _ = test_images(256)
    images = np.concatenate([images, images])  # any window of up to 256 images
    print("ready", flush=True)
    for line in sys.stdin:
        n, seconds = int(line.split()[0]), float(line.split()[1])
        batches = [tf.constant(images[i:i + n]) for i in range(0, 256, 7)]
        infer(images=batches[0])  # a new batch size may need a new kernel plan
        record, i = [], 0
        warm = time.perf_counter() + 1.0
        while time.perf_counter() < warm:
            infer(images=batches[i % len(batches)])["probabilities"].numpy()
            i += 1
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            infer(images=batches[i % len(batches)])["probabilities"].numpy()
            record.extend([(t0, time.perf_counter() - t0)] * n)  # every image of the batch waited this long
            i += 1
        print(json.dumps(summarise(record, [], seconds)), flush=True)


class InProcess:
    """The in-process service as a child process, so its memory and start-up are its own."""

    def __init__(self, model_base: Path, log: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "inprocess", "--model-base",
                                      str(model_base)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), text=True,  # noqa: SIM115
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the in-process service did not start; see {log}")

    def run(self, n: int, seconds: float) -> dict:
        self.proc.stdin.write(f"{n} {seconds}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


def measure_peak() -> float:
    """GFLOP/s of an FP32 matmul on this machine (bench_peak.py), in a process of its own."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_peak.py"), "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
    return float(json.loads(out.strip().splitlines()[-1])["gflops"])


def plot(results: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for service, levels in results.items():
        clients = sorted(levels)
        left.plot(clients, [levels[n]["images_per_s"] for n in clients], marker="o", label=service)
        right.plot(clients, [levels[n]["p99_ms"] for n in clients], marker="o", label=service)
    for ax, label in ((left, "images/s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(sorted({n for levels in results.values() for n in levels}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ---- processes ----------------------------------------------------------------------------------------------


def wait_http(port: int, proc: subprocess.Popen, path: str = "/docs", timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never answered")


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    out.close()
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- load ---------------------------------------------------------------------------------------------------


def multipart(png: bytes, port: int) -> bytes:
    boundary = b"benchboundary7d1f"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="img.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n")
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n").encode()
    return head + body


async def http_client(port: int, requests: list[bytes], offset: int, stop_at: float, record: list,
                      errors: list) -> None:
    """One keep-alive HTTP/1.1 connection; a minimal client so the load generator stays cheap."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head[9:12] == b"200":
                record.append((t0, time.perf_counter() - t0))
            else:
                errors.append(head[9:12].decode())
    finally:
        writer.close()


async def grpc_clients(target: str, requests: list, n: int, seconds: float) -> tuple[list, list]:
    import grpc

    from client.protos.tensorflow_serving.apis import prediction_service_pb2_grpc
    from client.tfserving import CHANNEL_OPTIONS

    record: list = []
    errors: list = []
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        await stub.Predict(requests[0], timeout=30)

        async def one(offset: int, stop_at: float, rec: list) -> None:
            i = offset
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await stub.Predict(requests[i % len(requests)], timeout=30)
                    rec.append((t0, time.perf_counter() - t0))
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc.code().name)
                i += 1

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(one(k * 7, warm, []) for k in range(n)))
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(one(k * 7, stop_at, record) for k in range(n)))
    return record, errors


async def http_load(port: int, requests: list[bytes], n: int, seconds: float) -> tuple[list, list]:
    warm = time.perf_counter() + 1.0
    errors: list = []
    await asyncio.gather(*(http_client(port, requests, k * 7, warm, [], errors) for k in range(n)))
    record: list = []
    errors.clear()
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(http_client(port, requests, k * 7, stop_at, record, errors) for k in range(n)))
    return record, errors


def summarise(record: list, errors: list, seconds: float) -> dict:
    lat = np.array([r[1] for r in record]) * 1000 if record else np.array([np.nan])
    return {"images_per_s": len(record) / seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(record), "errors": len(errors)}


# ---- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", type=Path, default=ROOT / "models" / "cifar10")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per service, level and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is reported")
    parser.add_argument("--services", nargs="+", default=list(SERVICES), choices=SERVICES)
    parser.add_argument("--batching", default=str(ROOT / "serving" / "config" / "batching.config"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw images/s and p99 against clients into this PNG")
    parser.add_argument("--serve", choices=("naive", "careful", "inprocess"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = args.model_base.resolve()
    if args.serve == "inprocess":
        serve_inprocess(base)
        return
    if args.serve:
        serve_baseline(args.serve, args.port, base)
        return

    from client import tfserving

    images, _ = test_images(256)
    pngs = [png_bytes(img) for img in images]
    logs = Path(os.environ.get("BENCH_LOGS", "/tmp")) / f"bench-serving-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {s: {} for s in args.services}
    peak_gflops = measure_peak()  # before any service starts, so nothing else runs beside it
    meta_path = latest_version(base) / "metadata.json"
    depth = (json.loads(meta_path.read_text()).get("depth") if meta_path.exists() else None) or 20
    flop_per_image = forward_flop(depth)
    grpc_port, rest_port = free_port(), free_port()
    model_server = start([sys.executable, "-m", "serving.modelserver", f"--port={grpc_port}",
                          f"--rest_api_port={rest_port}", "--model_name=cifar10", f"--model_base_path={base}",
                          "--enable_batching=true", f"--batching_parameters_file={args.batching}"],
                         logs / "modelserver.log")
    procs = [model_server]
    named = {"model server": model_server}
    inprocess: InProcess | None = None
    rss: dict[str, float] = {}
    try:
        wait_http(rest_port, model_server, "/v1/models/cifar10")
        with tfserving.ModelServerClient(f"127.0.0.1:{grpc_port}") as c:
            version = max(s.version for s in c.model_status() if s.state == "AVAILABLE")
        # Every service runs from the start (idle ones cost nothing) so that the rounds below can interleave
        # them: on a shared machine, load from elsewhere then hits all services alike.
        runners = {}
        for service in args.services:
            if service == "in-process":
                inprocess = InProcess(base, logs / "inprocess.log")
                procs.append(inprocess.proc)
                named[service] = inprocess.proc
                runners[service] = lambda n, svc=inprocess: svc.run(n, args.seconds)
                continue
            if service.startswith("grpc"):
                if service.endswith("(png)"):
                    reqs = [tfserving.encoded_request("cifar10", [p]) for p in pngs]
                else:
                    reqs = [tfserving.pixels_request("cifar10", img[None]) for img in images]
                runners[service] = lambda n, reqs=reqs: summarise(
                    *asyncio.run(grpc_clients(f"127.0.0.1:{grpc_port}", reqs, n, args.seconds)), args.seconds)
                continue
            port = free_port()
            if service == "gateway":
                proc = start([sys.executable, "-m", "serving.gateway"], logs / "gateway.log", {
                    "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
                    "GATEWAY_MODEL_SERVER": f"127.0.0.1:{grpc_port}"})
                procs.append(proc)
                named["gateway"] = proc
                wait_http(port, proc, "/healthz")
            else:
                kind = "naive" if service == "naive" else "careful"
                proc = start([sys.executable, __file__, "--serve", kind, "--port", str(port),
                              "--model-base", str(base)], logs / f"{kind}.log")
                procs.append(proc)
                named[service] = proc
                wait_http(port, proc)
            reqs_http = [multipart(p, port) for p in pngs]
            runners[service] = lambda n, port=port, reqs_http=reqs_http: summarise(
                *asyncio.run(http_load(port, reqs_http, n, args.seconds)), args.seconds)
        print(f"model {base} version {version}; {os.cpu_count()} CPUs; peak {peak_gflops:.0f} GFLOP/s FP32; "
              f"{args.rounds} rounds of {args.seconds:.0f} s per service and level, best round reported; logs {logs}")
        for n in args.clients:
            for r in range(args.rounds):
                order = args.services[r % len(args.services):] + args.services[:r % len(args.services)]
                for service in order:
                    got = runners[service](n)
                    best = results[service].get(n)
                    if best is None or got["images_per_s"] > best["images_per_s"]:
                        results[service][n] = got
                    print(f"  {service:22s} {n:3d} clients  {got['images_per_s']:8.1f} img/s  "
                          f"p50 {got['p50_ms']:7.1f} ms  p99 {got['p99_ms']:7.1f} ms  errors {got['errors']}",
                          flush=True)
        rss = {name: resident_mb(proc.pid) for name, proc in named.items()}  # after the load: steady state
    finally:
        if inprocess is not None:
            inprocess.proc.stdin.close()
        for proc in procs:
            stop(proc)

    print("\n| service | " + " | ".join(f"{n} clients img/s (p50 / p99 ms)" for n in args.clients) + " |")
    print("|---|" + "---|" * len(args.clients))
    for service, levels in results.items():
        cells = [f"{r['images_per_s']:.0f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})" for r in levels.values()]
        print(f"| {service} | " + " | ".join(cells) + " |")
    if "gateway" in results and 32 in results["gateway"]:
        gw = results["gateway"][32]["images_per_s"]
        print("\nat 32 clients, gateway images/s relative to:")
        for other in results:
            if other != "gateway" and 32 in results[other] and results[other][32]["images_per_s"]:
                print(f"  {other:22s} {gw / results[other][32]['images_per_s']:.2f}x")
    print("\nresident memory after the load: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    best_service, best_n = max(((s, n) for s, levels in results.items() for n in levels),
                               key=lambda sn: results[sn[0]][sn[1]]["images_per_s"])
    best = results[best_service][best_n]["images_per_s"]
    fraction = best * flop_per_image / (peak_gflops * 1e9)
    print(f"best: {best_service} at {best_n} clients, {best:.0f} images/s x {flop_per_image / 1e6:.1f} MFLOP = "
          f"{best * flop_per_image / 1e9:.0f} GFLOP/s = {100 * fraction:.0f} % of the measured peak "
          f"({peak_gflops:.0f} GFLOP/s FP32 matmul)")
    if args.json:
        args.json.write_text(json.dumps({"model_base": str(base), "version": version, "results": results,
                                         "resident_mb": rss, "peak_gflops": peak_gflops,
                                         "flop_per_image": flop_per_image, "best_fraction_of_peak": fraction},
                                        indent=2))
    if args.plot:
        plot(results, args.plot, f"ResNet-{depth} v1 version {version}, {os.cpu_count()} CPUs, one 32x32 PNG "
             f"per request; best round of {args.rounds}")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
