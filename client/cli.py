"""`python -m client`: classify images and show model status, through the gateway (REST) or the model server (gRPC).

    python -m client classify cat.png ship.jpg --top-k 3
    python -m client classify cat.png --via grpc --label canary --json
    python -m client status --via grpc

Exit codes (scripts can rely on them):
  0  done
  2  usage error
  3  bad input image (unreadable file, not an image, too large, ...), locally or as judged by the server
  4  server unavailable or failing (connection refused, timeout, 5xx, overloaded)
  5  request refused (unknown version or label, missing or wrong API key)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client import contract

EXIT_OK, EXIT_USAGE, EXIT_IMAGE, EXIT_SERVER, EXIT_REFUSED = 0, 2, 3, 4, 5

DEFAULT_GATEWAY = os.environ.get("CIFAR10_GATEWAY", "http://127.0.0.1:8000")
DEFAULT_MODEL_SERVER = os.environ.get("CIFAR10_MODEL_SERVER", "127.0.0.1:8500")
STATUS_LABELS = ("stable", "canary")


class CliError(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--via", choices=("rest", "grpc"), default="rest",
                        help="rest: through the gateway (default); grpc: straight to the model server")
    common.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="URL",
                        help="gateway base URL (default %(default)s; env CIFAR10_GATEWAY)")
    common.add_argument("--model-server", default=DEFAULT_MODEL_SERVER, metavar="HOST:PORT",
                        help="model server gRPC target (default %(default)s; env CIFAR10_MODEL_SERVER)")
    common.add_argument("--api-key", default=os.environ.get("CIFAR10_API_KEY"),
                        help="gateway API key (env CIFAR10_API_KEY)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds (default %(default)s)")
    common.add_argument("--json", action="store_true", help="print JSON (the gateway's answer shape)")

    parser = argparse.ArgumentParser(
        prog="python -m client", description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Exit codes"):], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("classify", parents=[common], help="classify image files")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image, 1-10 (default %(default)s)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--version", type=int, help="model version (default: the server's choice, or --label)")
    target.add_argument("--label", help="version label, e.g. stable or canary")
    p.add_argument("--signature", choices=("pixels", "bytes"), default="pixels",
                   help="with --via grpc: pixels (decode and resize here, uint8 signature) or bytes (send the "
                   "encoded file, the model's predict_images signature)")
    p.add_argument("--all-probabilities", action="store_true", help="include all ten probabilities")
    sub.add_parser("status", parents=[common], help="model versions, their states and labels")
    return parser


# ---- classify ------------------------------------------------------------------------------------------------


def _read_files(files: list[Path]) -> list[bytes]:
    data = []
    for f in files:
        try:
            data.append(f.read_bytes())
        except OSError as exc:
            raise CliError(EXIT_IMAGE, f"{f}: cannot read: {exc.strerror or exc}") from None
    return data


def _top(probabilities: np.ndarray, k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": contract.CLASS_NAMES[i], "class_id": int(i), "probability": float(probabilities[i])}
            for i in order]


def classify_grpc(args: argparse.Namespace) -> dict[str, Any]:
    from client.tfserving import ModelServerClient, ModelServerError

    data = _read_files(args.files)
    with ModelServerClient(args.model_server, timeout=args.timeout) as client:
        try:
            if args.signature == "bytes":
                prediction = client.predict_encoded(data, version=args.version, label=args.label)
            else:
                from client.preprocessing import ImageError, load_image, to_model_input

                images = []
                for path, blob in zip(args.files, data, strict=True):
                    try:
                        images.append(load_image(blob))
                    except ImageError as exc:
                        raise CliError(EXIT_IMAGE, f"{path}: {exc.code}: {exc.message}") from None
                prediction = client.predict_pixels(to_model_input(images), version=args.version, label=args.label)
        except ModelServerError as exc:
            raise CliError(_grpc_exit(exc.code, exc.message), f"model server: {exc.code.name}: {exc.message}") from None
    predictions = []
    for path, row in zip(args.files, prediction.probabilities, strict=True):
        item: dict[str, Any] = {"filename": path.name, "top": _top(row, args.top_k)}
        if args.all_probabilities:
            item["probabilities"] = {name: float(p) for name, p in zip(contract.CLASS_NAMES, row, strict=True)}
        predictions.append(item)
    return {"model": contract.MODEL_NAME, "version": prediction.version, "predictions": predictions}


def classify_rest(args: argparse.Namespace) -> dict[str, Any]:
    from client.gateway_client import GatewayClient, GatewayError

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise CliError(EXIT_IMAGE, f"cannot read: {', '.join(missing)}")
    with GatewayClient(args.gateway, timeout=args.timeout, api_key=args.api_key) as gateway:
        try:
            result = gateway.classify(args.files, top_k=args.top_k, version=args.version, label=args.label,
                                      all_probabilities=args.all_probabilities)
        except GatewayError as exc:
            raise CliError(_http_exit(exc.status), f"gateway: {exc.status} {exc.code}: {exc.message}") from None
    return result.raw


def _http_exit(status: int) -> int:
    if status == 0 or status >= 500 or status == 429:
        return EXIT_SERVER
    if status in (401, 403, 404):
        return EXIT_REFUSED
    return EXIT_IMAGE  # 400, 413, 415, 422: the request's images


def _grpc_exit(code: grpc.StatusCode, message: str) -> int:
    if code == grpc.StatusCode.NOT_FOUND or "label" in message.lower():
        return EXIT_REFUSED
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_IMAGE
    return EXIT_SERVER


def print_classification(body: dict[str, Any]) -> None:
    print(f"model {body['model']} version {body['version']}")
    width = max(len(p.get("filename") or "") for p in body["predictions"])
    for p in body["predictions"]:
        tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in p["top"])
        print(f"{(p.get('filename') or ''):<{width}}  {tops}")


# ---- status --------------------------------------------------------------------------------------------------


def status_grpc(args: argparse.Namespace) -> dict[str, Any]:
    from client.tfserving import ModelServerClient, ModelServerError

    with ModelServerClient(args.model_server, timeout=args.timeout) as client:
        try:
            states = client.model_status()
        except ModelServerError as exc:
            raise CliError(_grpc_exit(exc.code, exc.message), f"model server: {exc.code.name}: {exc.message}") from None
        labels: dict[int, list[str]] = {}
        for name in STATUS_LABELS:
            # GetModelStatus cannot list labels; metadata through a label names the version it resolves to.
            try:
                version = int(client.metadata(label=name)["model_spec"]["version"])
            except (ModelServerError, KeyError, ValueError):
                continue
            labels.setdefault(version, []).append(name)
    versions = [{"version": s.version, "state": s.state, "labels": labels.get(s.version, []),
                 **({"error": s.error_message} if s.error_code != "OK" else {})} for s in states]
    return {"model": contract.MODEL_NAME, "versions": versions}


def status_rest(args: argparse.Namespace) -> dict[str, Any]:
    from client.gateway_client import GatewayClient, GatewayError

    with GatewayClient(args.gateway, timeout=args.timeout, api_key=args.api_key) as gateway:
        try:
            info = gateway.models()
        except GatewayError as exc:
            raise CliError(_http_exit(exc.status), f"gateway: {exc.status} {exc.code}: {exc.message}") from None
    return {"model": info.model, "versions": [vars(v) for v in info.versions]}


def print_status(body: dict[str, Any]) -> None:
    print(f"model {body['model']}")
    print(f"{'version':>8}  {'state':<10} labels")
    for v in body["versions"]:
        extra = f"  error: {v['error']}" if v.get("error") else ""
        print(f"{v['version']:>8}  {v['state']:<10} {','.join(v['labels'])}{extra}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "classify":
            if not 1 <= args.top_k <= len(contract.CLASS_NAMES):
                raise CliError(EXIT_USAGE, f"--top-k must be 1 to {len(contract.CLASS_NAMES)}")
            body = classify_grpc(args) if args.via == "grpc" else classify_rest(args)
            print(json.dumps(body, indent=1)) if args.json else print_classification(body)
        else:
            body = status_grpc(args) if args.via == "grpc" else status_rest(args)
            print(json.dumps(body, indent=1)) if args.json else print_status(body)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK
