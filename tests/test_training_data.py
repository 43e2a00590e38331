"""CIFAR-10 loading (real archive, small archives in the official format, error paths), split, augmentation."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from training.data import (
    Cifar10,
    DataError,
    augment_course,
    augment_paper,
    eval_dataset,
    load_cifar10,
    train_dataset,
    train_val_split,
)

# Published in ../shared/data/README.md.
TEST_LABELS_SHA256 = "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"
TRAIN_IMAGES_SHA256 = "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a"


@pytest.fixture(scope="module")
def real(cifar_archive) -> Cifar10:
    return load_cifar10(cifar_archive)


def test_real_archive_in_place(real):
    assert real.train.images.shape == (50_000, 32, 32, 3) and real.train.images.dtype == np.uint8
    assert real.test.images.shape == (10_000, 32, 32, 3)
    assert list(real.train.labels[:10]) == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert hashlib.sha256(real.test.labels.tobytes()).hexdigest() == TEST_LABELS_SHA256
    assert real.checksum() == TRAIN_IMAGES_SHA256
    assert np.bincount(real.train.labels).tolist() == [5000] * 10
    np.testing.assert_allclose(real.train.images.reshape(-1, 3).mean(0), [125.31, 122.95, 113.87], atol=0.01)


def _batch(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    data = images.transpose(0, 3, 1, 2).reshape(n, -1)  # official layout: R plane, G plane, B plane
    raw = pickle.dumps({b"data": data, b"labels": labels.tolist()}, protocol=3)
    return raw, images, labels


def _write_official(path, n: int = 20, skip: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A small archive in the official layout; returns the train images and labels it holds."""
    images, labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
            raw, img, lab = _batch(n, i)
            if name.startswith("data"):
                images.append(img)
                labels.append(lab)
            if name == skip:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return np.concatenate(images), np.concatenate(labels)


def test_small_official_archive_and_folder(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    images, labels = _write_official(archive)
    data = load_cifar10(archive)
    np.testing.assert_array_equal(data.train.images, images)  # CHW planes -> HWC
    np.testing.assert_array_equal(data.train.labels, labels)
    assert len(data.test) == 20
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    for folder in (tmp_path / "extracted", tmp_path / "extracted" / "cifar-10-batches-py"):
        np.testing.assert_array_equal(load_cifar10(folder).train.images, images)


def test_missing_truncated_and_wrong_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope.tar.gz")
    archive = tmp_path / "full.tar.gz"
    _write_official(archive, n=200)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated"):
        load_cifar10(truncated)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(DataError):
        load_cifar10(junk)
    partial = tmp_path / "partial.tar.gz"
    _write_official(partial, skip="data_batch_3")
    with pytest.raises(DataError, match="lacks data_batch_3"):
        load_cifar10(partial)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="lacks"):
        load_cifar10(tmp_path / "empty")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
            raw = pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="expected \\[N, 3072\\]"):
        load_cifar10(bad)


def test_split_is_seeded_and_disjoint(real):
    train, val = train_val_split(real.train, 5000, seed=29)
    again, val_again = train_val_split(real.train, 5000, seed=29)
    other, _ = train_val_split(real.train, 5000, seed=1)
    assert len(train) == 45_000 and len(val) == 5000
    np.testing.assert_array_equal(val.labels, val_again.labels)
    assert not np.array_equal(train.labels, other.labels)
    seen = {img.tobytes() for img in val.images[:500]}
    assert not any(img.tobytes() in seen for img in train.images[:5000])


def test_augmentation_is_seeded_and_shape_preserving(real):
    import tensorflow as tf

    x = tf.constant(real.test.images[:16])
    seed = tf.constant([1, 2])
    for fn in (augment_paper, augment_course):
        a, b = fn(x, seed).numpy(), fn(x, seed).numpy()
        np.testing.assert_array_equal(a, b)
        assert a.shape == (16, 32, 32, 3)
        assert not np.array_equal(a, fn(x, tf.constant([1, 3])).numpy())
        assert 0 <= a.min() and a.max() <= 255
    # Pad-crop-flip only moves pixels: every crop is a window of the zero-padded image, maybe mirrored.
    out = augment_paper(x, seed).numpy()
    padded = np.pad(real.test.images[:16], ((0, 0), (4, 4), (4, 4), (0, 0)))
    for img, src in zip(out, padded):
        windows = [src[r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(np.array_equal(img, w) or np.array_equal(img, w[:, ::-1]) for w in windows)


def test_pipeline_epochs_are_reproducible(real):
    train, _ = train_val_split(real.train, 1000, seed=29)
    train = train.take(256)
    full = [(x.numpy(), y.numpy()) for x, y in train_dataset(train, 64, "paper", 29, 0, 3)]
    resumed = [(x.numpy(), y.numpy()) for x, y in train_dataset(train, 64, "paper", 29, 2, 3)]
    assert len(full) == 12 and len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(full[8:], resumed):
        # Epoch 3 is the same batches, augmented the same way, whether or not epochs 1-2 ran before.
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    labels = [y.argmax(1) for _, y in full]
    assert not np.array_equal(np.concatenate(labels[:4]), np.concatenate(labels[4:8]))  # reshuffled each epoch
    x, y = next(iter(eval_dataset(real.test.take(10), 5)))
    assert x.shape == (5, 32, 32, 3) and y.shape == (5, 10)
