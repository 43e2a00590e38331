"""The training loop: Keras `fit` with per-epoch checkpoints that make a killed run resumable."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from training.config import TrainConfig
from training.data import Split, eval_dataset, load_cifar10, train_dataset, train_val_split

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger("training")

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
LOG_FILE = "log.csv"
BEST_MODEL = "best.keras"
# Settings that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_FIELDS = {"out", "notes", "data"}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def configure_runtime(cfg: TrainConfig) -> tuple[tf.distribute.Strategy, bool]:
    """Devices, strategy, precision and determinism; call before any model is built."""
    import keras
    import tensorflow as tf

    if cfg.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.cpu_devices)
    gpus = tf.config.list_physical_devices("GPU")
    precision = cfg.precision if cfg.precision != "auto" else ("mixed_float16" if gpus else "float32")
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()

    mode = cfg.distribute
    if mode == "auto":
        if os.environ.get("TF_CONFIG"):
            mode = "multiworker"
        elif len(gpus) > 1 or cfg.cpu_devices > 1:
            mode = "mirrored"
        else:
            mode = "none"
    if mode == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif mode == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif mode == "none":
        strategy = tf.distribute.get_strategy()
    else:
        raise ValueError(f"unknown distribution {cfg.distribute!r}: use auto, none, mirrored or multiworker")
    jit = cfg.xla == "on" or (cfg.xla == "auto" and bool(gpus))
    log.info("precision %s, distribution %s over %d replica(s), XLA %s", precision, mode,
             strategy.num_replicas_in_sync, "on" if jit else "off")
    return strategy, jit


def build_compiled_model(cfg: TrainConfig, steps_per_epoch: int, jit: bool) -> keras.Model:
    import keras

    from training.model import Regularization, build_model
    from training.schedules import make_schedule

    reg = Regularization(cfg.initializer, cfg.penalty, cfg.penalty_strength, cfg.dropout)
    model = build_model(cfg.arch, cfg.depth, reg)
    lr = make_schedule(cfg.schedule, cfg.lr, steps_per_epoch, cfg.epochs, cfg.warmup_epochs)
    if cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(lr)
    elif cfg.optimizer == "sgd":
        opt = keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use adam or sgd")
    model.compile(
        optimizer=opt,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit,
    )
    return model


def load_weights_from(model: keras.Model, source: str) -> None:
    """Warm start: weights of a `.keras` model or of a SavedModel version this project exported."""
    import keras
    import tensorflow as tf

    path = Path(source)
    if path.is_dir():
        exported = tf.saved_model.load(str(path))
        weights = [v.numpy() for v in exported.model_weights]
    else:
        weights = keras.models.load_model(path, compile=False).get_weights()
    model.set_weights(weights)
    log.info("warm start from %s", source)


class EpochCheckpoint:
    """Saves log row, best model, last model and state each epoch; the state file is the commit point."""

    def __init__(self, run_dir: Path, state: dict, total_epochs: int):
        import keras

        self.run_dir, self.state, self.total = run_dir, state, total_epochs
        self.started = time.monotonic()
        outer = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.monotonic()

            def on_epoch_end(self, epoch, logs=None):
                outer.epoch_end(self.model, epoch, dict(logs or {}))

        self.callback = _Callback()

    def epoch_end(self, model: keras.Model, epoch: int, logs: dict) -> None:
        import keras

        lr = model.optimizer.learning_rate
        logs["lr"] = float(keras.ops.convert_to_numpy(lr))
        logs["seconds"] = round(time.monotonic() - self.started, 2)
        row = {"epoch": epoch + 1, **{k: logs[k] for k in sorted(logs)}}
        log_path = self.run_dir / LOG_FILE
        new = not log_path.exists()
        with log_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        val_acc = logs.get("val_accuracy")
        if val_acc is None or val_acc > self.state["best_val_accuracy"]:
            # Without a validation split (--val-size 0: a final fit on all 50,000 training images) there is
            # nothing to select on, and the model kept is the last epoch's.
            self.state.update(best_val_accuracy=None if val_acc is None else float(val_acc), best_epoch=epoch + 1)
            tmp = self.run_dir / ".best.tmp.keras"  # model.save wants the suffix
            model.save(tmp)
            os.replace(tmp, self.run_dir / BEST_MODEL)
        last = self.run_dir / f"last-{epoch + 1}.keras"
        model.save(last)
        previous = self.state.get("last")
        self.state.update(epoch=epoch + 1, last=last.name)
        _write_atomic(self.run_dir / STATE_FILE, lambda p: p.write_text(json.dumps(self.state, indent=2)))
        if previous and previous != last.name:
            (self.run_dir / previous).unlink(missing_ok=True)
        validation = "" if val_acc is None else (
            f"  val_loss {logs.get('val_loss', math.nan):.4f}  val_acc {val_acc:.4f}")
        best = "" if val_acc is None else (
            f"  (best val_acc {self.state['best_val_accuracy']:.4f} @ {self.state['best_epoch']})")
        log.info("epoch %d/%d  loss %.4f  acc %.4f%s  lr %.2e  %.0fs%s", epoch + 1, self.total,
                 logs.get("loss", math.nan), logs.get("accuracy", math.nan), validation, logs["lr"], logs["seconds"],
                 best)


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop rows of an epoch that was logged but never committed (killed between the two writes)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows[: 1 + epochs_done])


def prepare_run(cfg: TrainConfig, fresh: bool = False) -> dict:
    """Create the run folder, or check that it belongs to this configuration and return its state."""
    run_dir = Path(cfg.out)
    state_path = run_dir / STATE_FILE
    if state_path.exists() and not fresh:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        mine = dataclasses.asdict(cfg)
        changed = sorted(k for k in mine if k not in RESUMABLE_FIELDS and saved.get(k) != mine[k])
        if changed:
            raise SystemExit(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); "
                "use another --out or --fresh to start over"
            )
        return json.loads(state_path.read_text())
    if fresh and run_dir.exists():
        for p in run_dir.iterdir():
            if p.is_file():
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return {"epoch": 0, "best_val_accuracy": -1.0, "best_epoch": 0, "last": None}


def load_splits(cfg: TrainConfig) -> tuple[Split, Split, Split, str]:
    data = load_cifar10(cfg.data)
    train, val = train_val_split(data.train, cfg.val_size, cfg.seed)
    return train.take(cfg.train_subset), val, data.test, data.checksum()


def train(cfg: TrainConfig, fresh: bool = False) -> dict:
    """Train (or resume) the run in `cfg.out`; returns its state. The best model is `best.keras`."""
    import keras

    state = prepare_run(cfg, fresh)
    run_dir = Path(cfg.out)
    if state["epoch"] >= cfg.epochs:
        log.info("%s already finished %d epochs", run_dir, state["epoch"])
        return state
    strategy, jit = configure_runtime(cfg)
    train_split, val_split, _, checksum = load_splits(cfg)
    state["data_sha256"] = checksum
    steps = math.ceil(len(train_split) / cfg.batch_size)
    log.info("training on %d images, validating on %d, %d steps/epoch", len(train_split), len(val_split), steps)

    with strategy.scope():
        if state["epoch"]:
            import training.schedules  # noqa: F401  (registers the schedules the checkpoint refers to)

            log.info("resuming %s after epoch %d", run_dir, state["epoch"])
            model = keras.models.load_model(run_dir / state["last"])
            _truncate_log(run_dir / LOG_FILE, state["epoch"])
        else:
            model = build_compiled_model(cfg, steps, jit)
            if cfg.warm_start:
                load_weights_from(model, cfg.warm_start)
    model.summary(print_fn=log.debug)

    ds = train_dataset(train_split, cfg.batch_size, cfg.augment, cfg.seed, state["epoch"], cfg.epochs)
    val_ds = eval_dataset(val_split) if len(val_split) else None
    checkpoint = EpochCheckpoint(run_dir, state, cfg.epochs)
    callbacks = [checkpoint.callback, keras.callbacks.TensorBoard(str(run_dir / "tensorboard"))]
    model.fit(
        ds, epochs=cfg.epochs, initial_epoch=state["epoch"], steps_per_epoch=steps,
        validation_data=val_ds, callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,  # a log file gets one line per epoch, not a bar per step
    )
    return state
