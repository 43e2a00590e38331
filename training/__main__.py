"""Command line: `python -m training {train,evaluate,export,compare} ...`; `--help` on each explains every option."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from training.config import RECIPES, TrainConfig, recipe
from training.data import DataError

HELP = {
    "arch": "architecture: resnet_v1 or wbnrg (the course's plain CNN baseline)",
    "depth": "ResNet depth 6n+2: 20, 32, 44, 56, 110, 1202, ...",
    "initializer": "weight initialisation: he_normal or glorot_uniform",
    "penalty": "weight penalty on conv kernels: l2, l1 or none",
    "penalty_strength": "weight penalty factor (Keras L2: loss += strength * sum(w^2))",
    "dropout": "dropout rate before the classifier (wBNRg: after each conv group)",
    "optimizer": "adam or sgd",
    "lr": "base (peak, for onecycle) learning rate",
    "momentum": "SGD momentum",
    "nesterov": "SGD with Nesterov momentum (true/false)",
    "schedule": "learning-rate schedule: course (steps at epochs 80/120/140/160), paper (steps at 32k/48k "
    "iterations), onecycle (warm-up then linear decay to 0), constant",
    "warmup_epochs": "onecycle: epochs of linear warm-up from lr/10",
    "label_smoothing": "label smoothing of the cross-entropy",
    "epochs": "number of epochs",
    "batch_size": "global batch size",
    "augment": "augmentation: course (shift 0.1, rotate 20 deg, flip), paper (pad 4, crop, flip) or none",
    "data": "cifar-10-python.tar.gz or its extracted folder (default: Keras downloader, needs internet)",
    "val_size": "training images held out for validation and checkpoint selection (0: a final fit on all "
    "training images, keeping the last epoch)",
    "train_subset": "train on the first N images of the training split only (quick runs)",
    "seed": "random seed (split, initialisation, shuffling, augmentation)",
    "out": "run folder: config, CSV log, TensorBoard logs, checkpoints; rerun to resume",
    "precision": "auto (mixed_float16 on GPU, float32 on CPU), float32, mixed_bfloat16 or mixed_float16",
    "xla": "XLA compilation: auto (GPU only), on, off",
    "distribute": "auto (MirroredStrategy over several devices, MultiWorkerMirroredStrategy with TF_CONFIG), "
    "none, mirrored, multiworker",
    "cpu_devices": "split the CPU into N logical devices (exercises tf.distribute without GPUs)",
    "deterministic": "deterministic ops (true/false): a resumed run reproduces an uninterrupted one",
    "warm_start": "start from the weights of a .keras model or an exported version folder (models/cifar10/N)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="course",
                        help="named configuration (default course); the options below override it: "
                        + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()))
    for f in dataclasses.fields(TrainConfig):
        if f.name not in HELP:
            continue
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type).split(" ")[0], str)
        if f.name == "train_subset":
            kind = int
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"{HELP[f.name]} (default: {f.default!r} or the recipe's)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name in HELP and getattr(args, f.name, None) is not None}
    return recipe(args.recipe, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train (or resume) a model, then evaluate it on the test set",
                             description="Train a model in a run folder; rerunning the same command resumes.")
    _add_config_options(p_train)
    p_train.add_argument("--fresh", action="store_true", help="discard an existing run in --out and start over")
    p_train.add_argument("--no-evaluate", action="store_true", help="skip the test-set evaluation at the end")
    p_train.add_argument("--export", metavar="BASE_PATH",
                         help="after training, export the best model as the next version under BASE_PATH "
                         "(e.g. models/cifar10)")

    p_eval = sub.add_parser("evaluate", help="test-set accuracy, per-class accuracy, confusion matrix, curves",
                            description="Evaluate a run's best model on the test set; writes JSON and PNGs.")
    p_eval.add_argument("run", help="run folder (the --out of train)")
    p_eval.add_argument("--data", help="cifar-10-python.tar.gz or its folder (default: the run's)")

    p_export = sub.add_parser("export", help="export a run's best model as the next servable version",
                              description="Write the next integer version under BASE_PATH atomically, "
                              "with both signatures, warm-up records and metadata, then verify it.")
    p_export.add_argument("run", help="run folder (the --out of train)")
    p_export.add_argument("--base-path", default="models/cifar10", help="model base path (default models/cifar10)")
    p_export.add_argument("--data", help="cifar-10-python.tar.gz or its folder (default: the run's)")

    p_compare = sub.add_parser("compare", help="runs side by side: validation accuracy per epoch, table and plot",
                               description="Compare runs on what they were chosen by: best validation accuracy "
                               "(test accuracy is shown where the run was evaluated, never used to choose).")
    p_compare.add_argument("runs", nargs="+", help="run folders")
    p_compare.add_argument("--plot", metavar="PNG", help="write validation accuracy against epoch to this PNG")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)

    try:
        run_command(args)
    except (DataError, ValueError) as exc:  # the user's input, not a bug: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_command(args: argparse.Namespace) -> None:
    if args.command == "train":
        from training.train import train

        cfg = config_from_args(args)
        train(cfg, fresh=args.fresh)
        if not args.no_evaluate:
            from training.evaluate import evaluate_run

            evaluate_run(cfg.out)
        if args.export:
            from training.export import export_run

            export_run(cfg.out, args.export)
    elif args.command == "evaluate":
        from training.evaluate import evaluate_run

        evaluate_run(args.run, data=args.data)
    elif args.command == "export":
        from training.export import export_run

        export_run(args.run, args.base_path, data=args.data)
    elif args.command == "compare":
        from training.evaluate import compare_runs

        print(compare_runs(args.runs, args.plot))


if __name__ == "__main__":
    sys.exit(main())
