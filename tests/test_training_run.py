"""Training end to end as a user runs it: CLI, a short real run, kill -9 and resume, tf.distribute, export."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from client import contract
from tests.conftest import ROOT

TINY = ["--recipe", "fast", "--depth", "8", "--val-size", "512"]


def run_training(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_help_explains_every_option():
    out = run_training("train", "--help").stdout
    for option in ("--recipe", "--depth", "--arch", "--initializer", "--penalty", "--penalty-strength", "--dropout",
                   "--optimizer", "--lr", "--schedule", "--epochs", "--batch-size", "--augment", "--data",
                   "--val-size", "--seed", "--out", "--precision", "--xla", "--distribute", "--warm-start",
                   "--export", "--fresh"):
        assert option in out
    assert "course" in out and "paper" in out and "fast" in out
    top = run_training("--help").stdout
    assert all(cmd in top for cmd in ("train", "evaluate", "export"))


def test_short_real_training_beats_chance(tmp_path, cifar_archive):
    out = tmp_path / "run"
    # Adam at batch 32 (the course's optimiser): enough steps for BatchNorm's moving statistics to settle.
    run_training("train", "--recipe", "course", "--depth", "8", "--val-size", "512", "--epochs", "2",
                 "--train-subset", "6000", "--augment", "none", "--data", str(cifar_archive), "--out", str(out))
    result = json.loads((out / "evaluation.json").read_text())
    assert result["test_images"] == 10_000
    assert result["test_accuracy"] > 0.30, result  # chance is 0.10
    assert np.array(result["confusion_matrix"]).sum() == 10_000
    assert set(result["per_class_accuracy"]) == set(contract.CLASS_NAMES)
    for png in ("learning_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(rows[0])
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "best.keras").exists() and json.loads((out / "state.json").read_text())["epoch"] == 2


def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path, cifar_archive):
    common = [*TINY, "--epochs", "3", "--train-subset", "3072", "--batch-size", "32", "--data", str(cifar_archive),
              "--no-evaluate"]
    straight = tmp_path / "straight"
    run_training("train", *common, "--out", str(straight))

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "training", "train", *common, "--out", str(resumed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = resumed / "state.json"
    deadline = time.monotonic() + 240
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "training stopped before its first epoch"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 2
    proc.wait()
    assert json.loads(state.read_text())["epoch"] < 3
    log = run_training("train", *common, "--out", str(resumed)).stdout
    assert "resuming" in log

    rows = [list(csv.DictReader((d / "log.csv").open())) for d in (straight, resumed)]
    assert [r["epoch"] for r in rows[1]] == ["1", "2", "3"]
    for a, b in zip(*rows):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-7), (key, a, b)


def test_mirrored_strategy_over_logical_cpus(tmp_path, cifar_archive):
    out = run_training("train", *TINY, "--epochs", "1", "--train-subset", "512", "--cpu-devices", "2",
                       "--data", str(cifar_archive), "--out", str(tmp_path / "r"), "--no-evaluate").stdout
    assert "distribution mirrored over 2 replica(s)" in out


def test_final_fit_without_validation_keeps_the_last_epoch(tmp_path, cifar_archive):
    # --val-size 0: the recipe was chosen on the validation split; the final fit uses every training image.
    out = tmp_path / "r"
    log = run_training("train", "--recipe", "fast", "--depth", "8", "--val-size", "0", "--epochs", "2",
                       "--train-subset", "512", "--data", str(cifar_archive), "--out", str(out)).stdout
    assert "validating on 0" in log and "epoch 2/2  loss" in log and "val_acc" not in log
    state = json.loads((out / "state.json").read_text())
    assert state["best_val_accuracy"] is None and state["best_epoch"] == 2
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_accuracy" not in rows[0]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["best_val_accuracy"] is None and result["best_epoch"] == 2 and result["test_images"] == 10_000
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_multiworker_strategy_from_tf_config(tmp_path, cifar_archive):
    from tests.conftest import free_port

    env = {**os.environ, "TF_CONFIG": json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{free_port()}"]}, "task": {"type": "worker", "index": 0}})}
    proc = subprocess.run(
        [sys.executable, "-m", "training", "train", *TINY, "--epochs", "1", "--train-subset", "512",
         "--data", str(cifar_archive), "--out", str(tmp_path / "r"), "--no-evaluate"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distribution multiworker" in proc.stdout


def test_changed_settings_do_not_silently_resume(tmp_path, cifar_archive):
    out = tmp_path / "r"
    run_training("train", *TINY, "--epochs", "1", "--train-subset", "256", "--data", str(cifar_archive),
                 "--out", str(out), "--no-evaluate")
    proc = subprocess.run([sys.executable, "-m", "training", "train", *TINY, "--epochs", "1", "--train-subset",
                           "256", "--lr", "0.3", "--data", str(cifar_archive), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "other settings (lr)" in proc.stderr


def test_bad_data_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training", "train", *TINY, "--data", str(tmp_path / "none.tar.gz"),
                           "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_runs_table_and_plot(tmp_path):
    # Two finished runs as `train` leaves them: compare shows what differs and what they were chosen by.
    for name, batch, vals, test in (("a", 128, [0.5, 0.81], 0.8), ("b", 64, [0.6, 0.84], None)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"lr": 0.1, "batch_size": batch, "out": str(run)}))
        rows = [{"epoch": i + 1, "accuracy": v, "val_accuracy": v} for i, v in enumerate(vals)]
        with (run / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if test is not None:
            (run / "evaluation.json").write_text(json.dumps({"test_accuracy": test}))
    out = run_training("compare", str(tmp_path / "a"), str(tmp_path / "b"), "--plot", str(tmp_path / "v.png")).stdout
    assert "| run | batch_size | epochs | best validation | test |" in out
    assert "| a | 128 | 2 | 81.00% | 80.00% |" in out and "| b | 64 | 2 | 84.00% | - |" in out
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
