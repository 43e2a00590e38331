"""Training configuration: one dataclass, and the named recipes that fill it in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    # model
    arch: str = "resnet_v1"  # resnet_v1 | wbnrg
    depth: int = 20  # 6n+2
    initializer: str = "he_normal"  # he_normal | glorot_uniform
    penalty: str = "l2"  # l2 | l1 | none
    penalty_strength: float = 1e-4
    dropout: float = 0.0
    # optimisation
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False
    schedule: str = "course"  # course | paper | onecycle | constant
    warmup_epochs: float = 0.0  # onecycle: linear ramp from lr/10 to lr
    label_smoothing: float = 0.0
    epochs: int = 200
    batch_size: int = 32
    augment: str = "course"  # course | paper | none
    # data
    data: str | None = None  # cifar-10-python.tar.gz or its folder; None: Keras downloader
    val_size: int = 5000
    train_subset: int | None = None  # use only the first N training images (quick runs, tests)
    seed: int = 29
    # run
    out: str = "runs/default"
    precision: str = "auto"  # auto (mixed_float16 on GPU, float32 on CPU) | float32 | mixed_bfloat16 | mixed_float16
    xla: str = "auto"  # auto (on GPU only) | on | off
    # auto (mirrored with >1 device, multiworker with TF_CONFIG) | none | mirrored | multiworker
    distribute: str = "auto"
    cpu_devices: int = 0  # split the CPU into N logical devices (to exercise tf.distribute without GPUs)
    deterministic: bool = True
    warm_start: str | None = None  # a .keras model or a SavedModel version folder to start from
    recipe: str = "course"
    notes: dict = field(default_factory=dict)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


RECIPES: dict[str, dict] = {
    # The course: Adam 1e-3, step decay by epoch, ImageDataGenerator-style augmentation, batch 32, 200 epochs.
    "course": dict(optimizer="adam", lr=1e-3, schedule="course", epochs=200, batch_size=32, augment="course"),
    # He et al. 2015: SGD momentum 0.9, lr 0.1 / 10 at 32k and 48k iterations, 64k iterations at batch 128
    # (182 epochs of 45k images), weight decay 1e-4 (Keras L2 of 5e-5: its gradient is 2 * strength * w).
    "paper": dict(
        optimizer="sgd", lr=0.1, momentum=0.9, schedule="paper", epochs=182, batch_size=128, augment="paper",
        penalty_strength=5e-5,
    ),
    # Our CPU budget recipe: one-cycle SGD (short warm-up, linear decay to zero) with Nesterov momentum,
    # a stronger weight decay (5e-4 as SGD weight decay) and label smoothing; pad-crop-flip augmentation.
    # Batch 64 gives twice the updates of 128 in the same 40 epochs (measured: docs/training.md).
    "fast": dict(
        optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, schedule="onecycle", warmup_epochs=3,
        label_smoothing=0.1, epochs=40, batch_size=64, augment="paper", penalty_strength=2.5e-4,
    ),
}


def recipe(name: str, **overrides) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use {', '.join(RECIPES)}")
    return TrainConfig(recipe=name, **{**RECIPES[name], **overrides})
