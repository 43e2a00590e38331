"""CIFAR-10: loading the official archive, the train/validation split, and the tf.data input pipelines.

Augmentation runs on the TensorFlow graph with stateless random ops seeded by (seed, epoch, batch), so an
epoch's batches are a pure function of the configuration: a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client.contract import CLASS_NAMES

if TYPE_CHECKING:
    import tensorflow as tf

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


class DataError(Exception):
    """The data set is missing, truncated or not CIFAR-10."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3], HWC RGB
    labels: np.ndarray  # uint8 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Cifar10:
    train: Split
    test: Split

    def checksum(self) -> str:
        """SHA-256 of the train images' raw bytes, as the data README publishes it."""
        return hashlib.sha256(np.ascontiguousarray(self.train.images).tobytes()).hexdigest()


def _decode_batch(raw: bytes, where: str) -> Split:
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.uint8)
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DataError(f"{where} is not a CIFAR-10 batch: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{where} has shape {data.shape} with {len(labels)} labels, expected [N, 3072]")
    # Rows hold the red plane, then green, then blue, each 32x32 row-major: CHW -> HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _concat(parts: list[Split]) -> Split:
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def _read_archive(path: Path) -> Cifar10:
    names = [*TRAIN_BATCHES, TEST_BATCH]
    found: dict[str, Split] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in names and member.isfile():
                    fileobj = tar.extractfile(member)
                    assert fileobj is not None
                    found[base] = _decode_batch(fileobj.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path} is truncated or not a tar archive: {exc}") from exc
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path} is not the CIFAR-10 python archive: it lacks {', '.join(missing)}")
    return Cifar10(_concat([found[n] for n in TRAIN_BATCHES]), found[TEST_BATCH])


def _read_folder(path: Path) -> Cifar10:
    folder = path / ARCHIVE_DIR if (path / ARCHIVE_DIR).is_dir() else path
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is not an extracted CIFAR-10 folder: it lacks {', '.join(missing)}")
    train = _concat([_decode_batch((folder / n).read_bytes(), str(folder / n)) for n in TRAIN_BATCHES])
    return Cifar10(train, _decode_batch((folder / TEST_BATCH).read_bytes(), str(folder / TEST_BATCH)))


def load_cifar10(path: str | Path | None = None) -> Cifar10:
    """Read `cifar-10-python.tar.gz` in place, or its extracted folder; None downloads via Keras."""
    if path is None:
        import keras  # only the online fallback needs it

        (xtr, ytr), (xte, yte) = keras.datasets.cifar10.load_data()
        data = Cifar10(Split(xtr, ytr.reshape(-1).astype(np.uint8)), Split(xte, yte.reshape(-1).astype(np.uint8)))
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist: pass the path of cifar-10-python.tar.gz or its folder")
        data = _read_folder(path) if path.is_dir() else _read_archive(path)
    for name, split in (("train", data.train), ("test", data.test)):
        if split.labels.size and int(split.labels.max()) >= len(CLASS_NAMES):
            raise DataError(f"{name} labels go up to {split.labels.max()}, CIFAR-10 has 10 classes")
    return data


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """A seeded random hold-out of `val_size` training images (the test set is never used for selection)."""
    if not 0 <= val_size < len(train):
        raise ValueError(f"validation size {val_size} must be in [0, {len(train)})")
    order = np.random.default_rng(seed).permutation(len(train))
    val_idx, train_idx = np.sort(order[:val_size]), np.sort(order[val_size:])
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


# ---- augmentation (graph ops) ----

def augment_paper(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """He et al.: pad 4 pixels with zeros, random 32x32 crop, random horizontal flip."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]])
    offsets = tf.random.stateless_uniform([n, 2], seed=seed, minval=0, maxval=9, dtype=tf.int32)
    # One gather per batch instead of a crop per image: build per-image row/column indices.
    rows = offsets[:, :1] + tf.range(32)[None, :]
    cols = offsets[:, 1:] + tf.range(32)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    return _random_flip(cropped, seed)


def _random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    n = tf.shape(images)[0]
    flip = tf.random.stateless_uniform([n], seed=seed + [0, 1]) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def augment_course(images: tf.Tensor, seed: tf.Tensor, shift: float = 0.1, rotation_deg: float = 20.0) -> tf.Tensor:
    """The course's ImageDataGenerator recipe on the graph: shifts of 10 %, rotations up to 20 degrees,
    horizontal flips; bilinear sampling with nearest-edge fill, as ImageDataGenerator does."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    u = tf.random.stateless_uniform([n, 3], seed=seed, minval=-1.0, maxval=1.0)
    theta = u[:, 0] * rotation_deg * math.pi / 180
    tx, ty = u[:, 1] * shift * 32, u[:, 2] * shift * 32
    c, s = tf.cos(theta), tf.sin(theta)
    center = 15.5
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): rotation about the centre, then shift.
    a2 = center - c * center + s * center + tx
    b2 = center - s * center - c * center + ty
    zeros = tf.zeros_like(c)
    transforms = tf.stack([c, -s, a2, s, c, b2, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32), transforms=transforms, output_shape=[32, 32],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST",
    )
    return _random_flip(out, seed)


AUGMENTATIONS = {"paper": augment_paper, "course": augment_course, "none": None}


def train_dataset(
    split: Split, batch_size: int, augment: str, seed: int, start_epoch: int, epochs: int
) -> tf.data.Dataset:
    """Batches for epochs [start_epoch, epochs): a fresh seeded shuffle and augmentation each epoch."""
    import tensorflow as tf

    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}: use {', '.join(AUGMENTATIONS)}")
    fn = AUGMENTATIONS[augment]
    images = tf.constant(split.images)
    labels = tf.constant(split.labels.astype(np.int32))
    n = len(split)

    def epoch_batches(epoch):
        epoch = tf.cast(epoch, tf.int32)
        order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([seed, epoch])))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate().map(
            lambda step, idx: (step, idx, epoch)
        )

    def make_batch(step, idx, epoch):
        x = tf.gather(images, idx)
        y = tf.one_hot(tf.gather(labels, idx), len(CLASS_NAMES))
        if fn is not None:
            x = fn(x, tf.stack([seed * 7919 + epoch, tf.cast(step, tf.int32)]))
        return tf.cast(x, tf.float32), y

    ds = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches)
    return ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(split: Split, batch_size: int = 500) -> tf.data.Dataset:
    import tensorflow as tf

    y = tf.one_hot(split.labels.astype(np.int32), len(CLASS_NAMES))
    ds = tf.data.Dataset.from_tensor_slices((split.images, y)).batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE)
