"""Test-set evaluation of a run: accuracy, per-class accuracy, confusion matrix, learning curves."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.config import TrainConfig
from training.data import CLASS_NAMES, load_cifar10

if TYPE_CHECKING:
    import keras

log = logging.getLogger("training")

EVALUATION_FILE = "evaluation.json"
CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"


def run_config(run_dir: str | Path) -> TrainConfig:
    return TrainConfig(**json.loads((Path(run_dir) / "config.json").read_text()))


def load_float32_model(run_dir: str | Path) -> keras.Model:
    """The run's best model rebuilt in float32, whatever precision it was trained in (serving is float32)."""
    import keras

    from training.model import Regularization, build_model

    cfg = run_config(run_dir)
    trained = keras.models.load_model(Path(run_dir) / "best.keras", compile=False)
    keras.mixed_precision.set_global_policy("float32")
    model = build_model(cfg.arch, cfg.depth, Regularization(cfg.initializer, cfg.penalty, cfg.penalty_strength,
                                                            cfg.dropout))
    model.set_weights(trained.get_weights())
    return model


def read_log(log_csv: Path) -> list[dict[str, str]]:
    """The rows of a run's log.csv (one per epoch)."""
    with log_csv.open(newline="") as f:
        return list(csv.DictReader(f))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n: int = len(CLASS_NAMES)) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    return np.bincount(labels.astype(np.int64) * n + predicted, minlength=n * n).reshape(n, n)


def evaluate_run(run_dir: str | Path, data: str | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    test = load_cifar10(data or cfg.data).test
    model = load_float32_model(run_dir)
    probs = model.predict(test.images.astype(np.float32), batch_size=500, verbose=0)
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(test.labels, predicted)
    state = json.loads((run_dir / "state.json").read_text())
    result = {
        "test_accuracy": float((predicted == test.labels).mean()),
        "test_images": int(len(test)),
        "per_class_accuracy": {name: float(cm[i, i] / max(cm[i].sum(), 1)) for i, name in enumerate(CLASS_NAMES)},
        "confusion_matrix": cm.tolist(),
        "best_val_accuracy": state["best_val_accuracy"],
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "data_sha256": state.get("data_sha256"),
        "parameters": int(model.count_params()),
        "model": f"{cfg.arch}-{cfg.depth}" if cfg.arch == "resnet_v1" else cfg.arch,
        "recipe": cfg.recipe,
    }
    (run_dir / EVALUATION_FILE).write_text(json.dumps(result, indent=2))
    plot_confusion(cm, run_dir / CONFUSION_PNG, result["test_accuracy"])
    plot_curves(run_dir / "log.csv", run_dir / CURVES_PNG)
    log.info("test accuracy %.4f (%d images); per class: %s", result["test_accuracy"], len(test),
             ", ".join(f"{k} {v:.3f}" for k, v in result["per_class_accuracy"].items()))
    return result


def plot_confusion(cm: np.ndarray, path: Path, accuracy: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix on the test set (accuracy {accuracy:.2%})")
    threshold = cm.max() / 2
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(log_csv: Path, path: Path) -> None:
    plt = _pyplot()
    rows = read_log(log_csv)
    if not rows:
        return
    epoch = [int(r["epoch"]) for r in rows]

    def col(name: str) -> list[float]:
        return [float(r[name]) for r in rows] if name in rows[0] else []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epoch, col(key), label="train")
        if col(f"val_{key}"):
            ax.plot(epoch, col(f"val_{key}"), label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epoch, col("lr"))
    axes[2].set_yscale("log")
    axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs: list[str | Path], plot: str | Path | None = None) -> str:
    """A Markdown table of runs (settings that differ, best validation, test where evaluated) and, optionally,
    their validation accuracy against epoch as a PNG."""
    runs = [Path(r) for r in run_dirs]
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    ignored = {"out", "notes"}
    differing = [k for k in configs[0] if k not in ignored and len({json.dumps(c.get(k)) for c in configs}) > 1]
    logs = [read_log(r / "log.csv") for r in runs]
    lines = ["| run | " + " | ".join(differing) + " | epochs | best validation | test |",
             "|---|" + "---:|" * (len(differing) + 3)]
    for r, cfg, rows in zip(runs, configs, logs, strict=True):
        val = [float(x["val_accuracy"]) for x in rows if x.get("val_accuracy")]
        evaluation = r / EVALUATION_FILE
        test = json.loads(evaluation.read_text())["test_accuracy"] if evaluation.exists() else None
        best_val = f"{max(val):.2%}" if val else "-"
        test_text = f"{test:.2%}" if test is not None else "-"
        lines.append(f"| {r.name} | " + " | ".join(str(cfg.get(k)) for k in differing)
                     + f" | {len(rows)} | {best_val} | {test_text} |")
    if plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r, rows in zip(runs, logs, strict=True):
            points = [(int(x["epoch"]), float(x["val_accuracy"])) for x in rows if x.get("val_accuracy")]
            if points:
                ax.plot(*zip(*points, strict=True), label=r.name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0.5, 0.95)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Validation accuracy of the runs the recipe was chosen among")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    return "\n".join(lines)
