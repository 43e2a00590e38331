"""`python -m serving.deploy [options] {status,init,canary,promote,rollback,retire}`: move version labels safely.

Typical cycle (see docs/deploy.md):

    python -m training train --warm-start models/cifar10/3 ... --export models/cifar10   # writes version 4
    python -m serving.deploy canary 4      # serve 4 beside stable under the `canary` label, check it
    python -m serving.deploy promote       # stable -> 4 (3 stays loaded for an instant rollback)
    python -m serving.deploy rollback      # stable -> 3 again, if 4 misbehaves
    python -m serving.deploy retire 4      # unload 4

Exit codes: 0 done; 1 a step failed and the previous config was restored; 2 usage or a refused precondition
(nothing changed); 3 a step failed and so did the undo: check `status` and fix the config by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from client.tfserving import ModelServerError
from serving.deploy.check import CHECK_IMAGES
from serving.deploy.config import DeployError, StepFailed
from serving.deploy.tool import Deployer, Options

DEFAULT_CONFIG = "serving/config/models.config"


def add_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The shared options; on the subcommands too (default SUPPRESS, so they do not reset what came before)."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--config", type=Path, default=d(Path(os.environ.get("DEPLOY_MODEL_CONFIG", DEFAULT_CONFIG))),
                        help=f"text ModelServerConfig the model server was started with (default {DEFAULT_CONFIG}; "
                        "env DEPLOY_MODEL_CONFIG)")
    parser.add_argument("--model-server", default=d(os.environ.get("DEPLOY_MODEL_SERVER", "127.0.0.1:8500")),
                        help="gRPC HOST:PORT of the model server (default 127.0.0.1:8500; env DEPLOY_MODEL_SERVER)")
    parser.add_argument("--apply", choices=("reload", "poll"), default=d("reload"),
                        help="reload: HandleReloadConfigRequest (default); poll: the server re-reads the file "
                        "(--model_config_file_poll_wait_seconds), waited for through its answers")
    parser.add_argument("--on-write", metavar="CMD", default=d(None),
                        help="shell command run after each write of the config, e.g. a kubectl apply of the "
                        "ConfigMap (with --apply poll)")
    parser.add_argument("--models-dir", type=Path, default=d(None),
                        help="the model base path as seen from here (default: the config's base_path when it "
                        "exists here, /models/... mapped to ./models/...); used to check that a version is on disk")
    parser.add_argument("--timeout", type=float, default=d(120.0), help="seconds per step (default 120)")
    parser.add_argument("--check-images", type=Path, default=d(CHECK_IMAGES),
                        help="folder of <name>_<class>.png images classified through each label after each step")
    parser.add_argument("--min-accuracy", type=float, default=d(0.0),
                        help="fail a step when the accuracy on the check images is below this (default 0)")
    parser.add_argument("--no-check", action="store_true", default=d(False),
                        help="only check that each label answers from its version (no output sanity checks)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.deploy", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Canary, promote, roll back and retire model versions by editing and applying the model "
        "config (TF Serving's two-step label moves, a check through each label, undo on failure).",
        epilog=__doc__[__doc__.index("Typical cycle"):],
    )
    add_options(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        add_options(p, suppress=True)
        return p

    command("status", "versions on disk, in the config and on the server, with labels and history")
    command("init", "serve one version as stable and canary (bootstrap or reset)").add_argument(
        "version", type=int, nargs="?", help="default: the newest version on disk")
    command("canary", "serve VERSION beside stable under the canary label").add_argument("version", type=int)
    command("promote", "move stable (and canary) to the canary version; the old stable stays loaded")
    command("rollback", "move stable (and canary) back to the previous stable version")
    command("retire", "stop serving VERSION (a canary on it falls back to stable)").add_argument("version", type=int)
    return parser


def print_status(status: dict) -> None:
    print(f"config {status['config']}  model server {status['model_server']}")
    if status["server_error"]:
        print(f"model server unreachable: {status['server_error']}")
    print(f"stable {status['stable']}  canary {status['canary']}  stable history {status['stable_history']}")
    print(f"{'version':>8} {'state':<10} {'config':<7} {'disk':<5} labels")
    for row in status["versions"]:
        disk = "?" if row["on_disk"] is None else ("yes" if row["on_disk"] else "no")
        print(f"{row['version']:>8} {row['state'] or '-':<10} {'yes' if row['configured'] else 'no':<7} "
              f"{disk:<5} {','.join(row['labels'])}" + (f"  error: {row['error']}" if row["error"] else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        config=args.config, model_server=args.model_server, apply=args.apply, models_dir=args.models_dir,
        timeout=args.timeout, check_images=args.check_images, min_accuracy=args.min_accuracy,
        on_write=args.on_write, check=not args.no_check,
    )
    quiet = args.json
    deployer = Deployer(options, say=(lambda _: None) if quiet else print)
    try:
        if args.action == "status":
            status = deployer.status()
            print(json.dumps(status, indent=1)) if args.json else print_status(status)
            return 0 if not status["server_error"] else 1
        record = deployer.run(args.action, getattr(args, "version", None))
        if args.json:
            print(json.dumps(record, indent=1))
        return 0
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if exc.undone else 3
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelServerError as exc:
        print(f"error: the model server answered {exc}", file=sys.stderr)
        return 1
    finally:
        deployer.close()


if __name__ == "__main__":
    sys.exit(main())
