"""Test accuracy of the served model through the whole service: CIFAR-10 test images as PNG uploads to the gateway.

Starts the model server and the gateway on 127.0.0.1 (as `make serve` does, on free ports), posts the 10,000
test images as multipart PNGs, 64 to a request, and compares the top class with the labels; the in-process figure
is the version's metadata.json (training/evaluate.py on the Keras model).

    python bench/eval_through_gateway.py [--model-base models/cifar10] [--images 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from bench_serving import ROOT, free_port, png_bytes, start, stop, test_images, wait_http


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-base", type=Path, default=ROOT / "models" / "cifar10")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--per-request", type=int, default=64)
    args = parser.parse_args()

    from client.contract import CLASS_NAMES

    images, labels = test_images(args.images)
    base = args.model_base.resolve()
    logs = Path("/tmp") / "eval-through-gateway"
    logs.mkdir(exist_ok=True)
    grpc_port, rest_port, port = free_port(), free_port(), free_port()
    server = start([sys.executable, "-m", "serving.modelserver", f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                    "--model_name=cifar10", f"--model_base_path={base}"], logs / "modelserver.log")
    gateway = start([sys.executable, "-m", "serving.gateway"], logs / "gateway.log", {
        "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "GATEWAY_MODEL_SERVER": f"127.0.0.1:{grpc_port}"})
    try:
        wait_http(rest_port, server, "/v1/models/cifar10")
        wait_http(port, gateway, "/readyz")
        predicted, versions = [], set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for start_at in range(0, len(images), args.per_request):
                files = []
                for i, img in enumerate(images[start_at:start_at + args.per_request]):
                    files.append(("files", (f"{start_at + i}.png", png_bytes(img), "image/png")))
                answer = http.post("/v1/classify", files=files, params={"top_k": 1})
                answer.raise_for_status()
                body = answer.json()
                versions.add(body["version"])
                predicted += [CLASS_NAMES.index(p["top"][0]["class"]) for p in body["predictions"]]
    finally:
        stop(gateway)
        stop(server)
    accuracy = float(np.mean(np.array(predicted) == labels))
    version = max(versions)
    meta = json.loads((base / str(version) / "metadata.json").read_text())
    print(f"version {version}: through the gateway {accuracy:.4f} on {len(labels)} test images; "
          f"in-process (metadata.json) {meta['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
