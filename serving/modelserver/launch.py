"""One command for both servers: the real tensorflow_model_server when it is on PATH, else the embedded one.

    python -m serving.modelserver.launch --port=8500 --rest_api_port=8501 \
        --model_config_file=serving/config/models.config ...

Flags only the embedded server knows (--bind_address, --model_base_path_rewrite) are dropped for the real
binary. Set MODELSERVER_IMPL=embedded (or =tfserving) to force a choice.
"""

from __future__ import annotations

import os
import shutil
import sys

EMBEDDED_ONLY = ("--bind_address", "--model_base_path_rewrite")


def real_binary() -> str | None:
    choice = os.environ.get("MODELSERVER_IMPL", "auto")
    if choice == "embedded":
        return None
    found = shutil.which("tensorflow_model_server")
    if choice == "tfserving" and not found:
        raise SystemExit("MODELSERVER_IMPL=tfserving but tensorflow_model_server is not on PATH")
    return found


def strip_embedded_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in EMBEDDED_ONLY:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    if binary:
        os.execv(binary, [binary, *strip_embedded_flags(argv)])
    if not any(a.startswith("--model_base_path_rewrite") for a in argv) and not os.path.isdir("/models"):
        # The shared config names the container path /models; outside a container use ./models.
        root = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")
        argv.append(f"--model_base_path_rewrite=/models={root}")
    from serving.modelserver.server import main as embedded_main

    return embedded_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
