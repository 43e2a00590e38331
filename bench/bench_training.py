"""Training throughput, side by side in one run: our tf.data pipeline against the course's Keras 2 pipeline.

    python bench/bench_training.py [--steps 60] [--batch-size 128] [--data PATH] [--run runs/fast-r20-b64]

Each configuration trains ResNet-20 v1 (the same builder, training/model.py) on real CIFAR-10 in its own
process, one after another, and reports images/s over `--steps` steps after a warm-up:
- course: tf-keras (Keras 2) ImageDataGenerator(width/height shift 0.1, rotation 20, flip).flow() with fit,
  float32, as the course ran it;
- ours (course aug) and ours (paper aug): Keras 3 fit on tf.data with augmentation on the graph, float32;
- ours bf16: the same with the mixed_bfloat16 policy (AVX-512 BF16 on this CPU).
With --run, it also reads that run's log.csv for the epochs and time our `fast` recipe took to reach 91 %
validation accuracy. Prints a table and writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar-10-python.tar.gz"
CONFIGS = {
    "course": "Keras 2 ImageDataGenerator + fit (course), fp32",
    "ours-course-aug": "tf.data + graph aug (course's), Keras 3 fit, fp32",
    "ours-paper-aug": "tf.data + graph aug (pad-crop-flip), Keras 3 fit, fp32",
    "ours-paper-aug-bf16": "tf.data + graph aug (pad-crop-flip), mixed_bfloat16",
}


def timing_callback(base, warmup: int, steps: int):
    class Timer(base):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())
            if len(self.times) >= warmup + steps:
                self.model.stop_training = True

    return Timer()


def worker(name: str, steps: int, batch: int, data: str) -> dict:
    warmup = 10
    if name == "course":
        # The builder is written against the keras namespace; Keras 2 (tf-keras) provides the same layers.
        import tf_keras

        sys.modules["keras"] = tf_keras
        from tf_keras.preprocessing.image import ImageDataGenerator

        from training.data import load_cifar10, train_val_split
        from training.model import resnet_v1

        tf_keras.utils.set_random_seed(29)
        train, _ = train_val_split(load_cifar10(data).train, 5000, 29)
        model = resnet_v1(20)
        model.compile(tf_keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
        gen = ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, rotation_range=20,
                                 horizontal_flip=True)
        flow = gen.flow(train.images.astype("float32"), tf_keras.utils.to_categorical(train.labels, 10),
                        batch_size=batch, seed=29)
        timer = timing_callback(tf_keras.callbacks.Callback, warmup, steps)
        model.fit(flow, steps_per_epoch=warmup + steps, epochs=1, callbacks=[timer], verbose=0)
    else:
        import keras

        from training.config import recipe
        from training.data import train_dataset
        from training.train import build_compiled_model, configure_runtime, load_splits

        cfg = recipe("fast", depth=20, batch_size=batch, data=data,
                     augment="course" if "course-aug" in name else "paper",
                     precision="mixed_bfloat16" if name.endswith("bf16") else "float32")
        _, jit = configure_runtime(cfg)
        train, _, _, _ = load_splits(cfg)
        model = build_compiled_model(cfg, steps_per_epoch=warmup + steps, jit=jit)
        ds = train_dataset(train, batch, cfg.augment, cfg.seed, 0, 1)
        timer = timing_callback(keras.callbacks.Callback, warmup, steps)
        model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, callbacks=[timer], verbose=0)
    t = timer.times
    seconds = t[warmup + steps - 1] - t[warmup - 1]
    return {"name": name, "images_per_s": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps}


def time_to_accuracy(log_csv: Path, target: float = 0.91) -> dict | None:
    if not log_csv.exists():
        return None
    from training.evaluate import read_log

    rows = read_log(log_csv)
    if not rows or "val_accuracy" not in rows[0]:
        return None  # a fit without a validation split (--val-size 0) has no accuracy to time
    elapsed = 0.0
    for row in rows:
        elapsed += float(row["seconds"])
        if float(row["val_accuracy"]) >= target:
            return {"epoch": int(row["epoch"]), "seconds": elapsed, "epochs_run": len(rows),
                    "mean_epoch_seconds": sum(float(r["seconds"]) for r in rows) / len(rows)}
    return {"epoch": None, "epochs_run": len(rows), "best_val_accuracy": max(float(r["val_accuracy"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--run", default=str(ROOT / "runs" / "fast-r20-b64"),
                        help="a finished `fast` run folder trained with a validation split")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size, args.data)))
        return

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = []
    for name in args.only or CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size), "--data", args.data],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((r["images_per_s"] for r in results if r["name"] == "course"), results[0]["images_per_s"])
    print(f"ResNet-20 v1 training, batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPU cores")
    print(f"{'configuration':<62} {'images/s':>9} {'ms/step':>8} {'vs course':>9}")
    for r in results:
        r["vs_course"] = r["images_per_s"] / base
        print(f"{CONFIGS[r['name']]:<62} {r['images_per_s']:9.0f} {r['ms_per_step']:8.0f} {r['vs_course']:8.2f}x")
    reach = time_to_accuracy(Path(args.run) / "log.csv")
    if reach:
        print(f"fast recipe ({args.run}): {reach}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps({"batch_size": args.batch_size, "steps": args.steps,
                                                   "results": results, "fast_time_to_91": reach}, indent=2))


if __name__ == "__main__":
    main()
