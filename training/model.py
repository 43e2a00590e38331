"""ResNet v1 for CIFAR-10 and the course's plain-CNN baseline ("wBNRg").

The builders follow the course material layer for layer (SPEC section 3): `res_layer` is the course's
resLyr, `res_block_v1` its resBlkV1, `resnet_v1` its createResNetV1, with the same layer names.
Pixel scaling lives in the model (a Rescaling layer), so the network takes raw uint8-valued RGB pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

NUM_CLASSES = 10
INPUT_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Regularization:
    """The course's regularisation options: initialisation, weight penalty, dropout."""

    initializer: str = "he_normal"  # or "glorot_uniform"
    penalty: str = "l2"  # "l2", "l1" or "none"
    strength: float = 1e-4
    dropout: float = 0.0  # ResNet: before the classifier; wBNRg: its own 0.25/0.5 unless set

    def regularizer(self) -> keras.regularizers.Regularizer | None:
        if self.penalty == "none" or self.strength == 0:
            return None
        if self.penalty == "l2":
            return keras.regularizers.L2(self.strength)
        if self.penalty == "l1":
            return keras.regularizers.L1(self.strength)
        raise ValueError(f"unknown weight penalty {self.penalty!r}: use l1, l2 or none")


def res_layer(
    x: keras.KerasTensor,
    filters: int = 16,
    kernel_size: int = 3,
    strides: int = 1,
    activation: str | None = "relu",
    batch_norm: bool = True,
    conv_first: bool = True,
    name: str = "",
    reg: Regularization = Regularization(),
) -> keras.KerasTensor:
    """Conv2D, then optional BatchNormalization and activation (BN-act-conv when conv_first=False)."""
    conv = layers.Conv2D(
        filters,
        kernel_size=kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer=reg.initializer,
        kernel_regularizer=reg.regularizer(),
        name=f"{name}_conv",
    )

    def norm_act(t: keras.KerasTensor) -> keras.KerasTensor:
        if batch_norm:
            t = layers.BatchNormalization(name=f"{name}_bn")(t)
        if activation is not None:
            t = layers.Activation(activation, name=f"{name}_{activation}")(t)
        return t

    return norm_act(conv(x)) if conv_first else conv(norm_act(x))


def res_block_v1(
    x: keras.KerasTensor,
    filters: int,
    num_blocks: int,
    downsample: bool,
    name: str,
    reg: Regularization = Regularization(),
) -> keras.KerasTensor:
    """`num_blocks` residual units of width `filters`; the first one halves the grid when downsampling."""
    for k in range(1, num_blocks + 1):
        prefix = f"{name}_Blk{k}"
        strides = 2 if downsample and k == 1 else 1
        y = res_layer(x, filters, strides=strides, name=f"{prefix}_Res1", reg=reg)
        y = res_layer(y, filters, activation=None, name=f"{prefix}_Res2", reg=reg)
        if strides != 1:
            # 1x1 projection shortcut so the shapes of x and y match.
            x = res_layer(
                x, filters, kernel_size=1, strides=strides, activation=None, batch_norm=False,
                name=f"{prefix}_lin", reg=reg,
            )
        x = layers.Add(name=f"{prefix}_add")([x, y])
        x = layers.Activation("relu", name=f"{prefix}_relu")(x)
    return x


def resnet_v1(depth: int = 20, reg: Regularization = Regularization()) -> keras.Model:
    """ResNet v1 of depth 6n+2 (20, 32, 44, 56, 110, 1202) for 32x32x3 inputs with raw 0..255 pixels."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet v1 depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    x = res_layer(x, 16, name="Inpt", reg=reg)
    x = res_block_v1(x, 16, n, downsample=False, name="Stg1", reg=reg)
    x = res_block_v1(x, 32, n, downsample=True, name="Stg2", reg=reg)
    x = res_block_v1(x, 64, n, downsample=True, name="Stg3", reg=reg)
    x = layers.AveragePooling2D(pool_size=8, name="AvgPool")(x)
    x = layers.Flatten(name="Flatten")(x)
    if reg.dropout:
        x = layers.Dropout(reg.dropout, name="Dropout")(x)
    # float32 output even under mixed precision, so probabilities are exact and exports are float32.
    outputs = layers.Dense(
        NUM_CLASSES, activation="softmax", kernel_initializer=reg.initializer, name="Output", dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name=f"ResNet{depth}_v1")


# The course's figure with wBNRg's widths is lost; this is the conventional VGG-like layout of its era:
# three groups of two 3x3 convs (32, 64, 128 filters), each group max-pooled and followed by Dropout 0.25,
# then Flatten, Dense(512, ReLU), Dropout 0.5 and the softmax. L2(0.001) on the last two convs, as taught.
WBNRG_WIDTHS = (32, 64, 128)
WBNRG_DENSE = 512


def wbnrg(reg: Regularization = Regularization(initializer="glorot_uniform", penalty="none")) -> keras.Model:
    """The course's plain baseline: conv (no activation) -> BN -> ReLU, pooled groups, dropout, L2 at the end."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    n_convs = 2 * len(WBNRG_WIDTHS)
    i = 0
    for g, width in enumerate(WBNRG_WIDTHS, start=1):
        for c in range(1, 3):
            i += 1
            last_two = i > n_convs - 2
            x = layers.Conv2D(
                width, 3, padding="same", kernel_initializer=reg.initializer,
                kernel_regularizer=keras.regularizers.L2(1e-3) if last_two else reg.regularizer(),
                name=f"G{g}_conv{c}",
            )(x)
            x = layers.BatchNormalization(name=f"G{g}_bn{c}")(x)
            x = layers.Activation("relu", name=f"G{g}_relu{c}")(x)
        x = layers.MaxPooling2D(2, name=f"G{g}_pool")(x)
        x = layers.Dropout(reg.dropout or 0.25, name=f"G{g}_drop")(x)
    x = layers.Flatten(name="Flatten")(x)
    x = layers.Dense(WBNRG_DENSE, activation="relu", kernel_initializer=reg.initializer, name="Dense")(x)
    x = layers.Dropout(0.5, name="Dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="Output", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="wBNRg")


def build_model(arch: str, depth: int = 20, reg: Regularization = Regularization()) -> keras.Model:
    """The model named by the configuration: `resnet_v1` (any depth 6n+2) or `wbnrg`."""
    if arch == "resnet_v1":
        return resnet_v1(depth, reg)
    if arch == "wbnrg":
        return wbnrg(reg)
    raise ValueError(f"unknown architecture {arch!r}: use resnet_v1 or wbnrg")
