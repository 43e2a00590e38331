"""Shared fixtures: the real CIFAR-10 archive, and a tiny model trained and exported by the training module.

Every test that needs a served model uses `model_base`: a fresh base path holding version 1 of a ResNet-8
trained for one epoch on real images (once per session, then copied), so servers under test load a real
export with both signatures, warm-up records and metadata.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CIFAR10_ARCHIVE", ROOT.parent / "shared" / "data" / "cifar-10-python.tar.gz"))

# Quiet TensorFlow in every subprocess the tests start.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not DATA.exists():
        pytest.fail(f"the CIFAR-10 archive is missing at {DATA} (set CIFAR10_ARCHIVE)")
    return DATA


def train_tiny(out: Path, base: Path, data: Path, *extra: str) -> None:
    """ResNet-8, one epoch on 1,024 real images, exported under `base` (about 30 s on 2 cores)."""
    cmd = [
        sys.executable, "-m", "training", "train", "--recipe", "fast", "--depth", "8", "--epochs", "1",
        "--train-subset", "1024", "--val-size", "256", "--data", str(data), "--out", str(out),
        "--export", str(base), *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory, cifar_archive: Path) -> Path:
    """The version folder of a tiny exported model, built once per test session. Do not modify it."""
    work = tmp_path_factory.mktemp("tiny-model")
    try:
        train_tiny(work / "run", work / "models" / "cifar10", cifar_archive)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"training the tiny model failed:\n{exc.stdout[-3000:]}\n{exc.stderr[-3000:]}")
    return work / "models" / "cifar10" / "1"


@pytest.fixture
def model_base(tmp_path: Path, exported_model: Path) -> Path:
    """A fresh model base path (…/cifar10) holding version 1; tests may add, break or remove versions."""
    base = tmp_path / "models" / "cifar10"
    base.mkdir(parents=True)
    shutil.copytree(exported_model, base / "1")
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
