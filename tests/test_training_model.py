"""The model builders: the course's architecture, names and parameter counts, and its options."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from training.model import Regularization, build_model, resnet_v1, wbnrg


def test_resnet20_matches_the_course():
    model = resnet_v1(20)
    assert model.count_params() == 274_442
    names = {layer.name for layer in model.layers}
    for name in ("Inpt_conv", "Inpt_bn", "Inpt_relu", "Stg1_Blk1_Res1_conv", "Stg1_Blk3_Res2_bn",
                 "Stg2_Blk1_lin_conv", "Stg2_Blk1_add", "Stg3_Blk3_relu", "AvgPool", "Output"):
        assert name in names
    # Only the first unit of stages 2 and 3 has a projection shortcut; Res2 has no activation.
    assert {n for n in names if n.endswith("_lin_conv")} == {"Stg2_Blk1_lin_conv", "Stg3_Blk1_lin_conv"}
    assert not any(n.endswith("Res2_relu") for n in names)
    assert model.get_layer("Stg2_Blk1_Res1_conv").strides == (2, 2)
    assert model.get_layer("Stg2_Blk1_lin_conv").kernel_size == (1, 1)
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("depth,blocks", [(8, 1), (32, 5), (56, 9), (110, 18)])
def test_depth_is_6n_plus_2(depth, blocks):
    model = resnet_v1(depth)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 2 * blocks + 2  # input conv, two per unit, two projections
    assert f"Stg3_Blk{blocks}_relu" in {layer.name for layer in model.layers}


@pytest.mark.parametrize("depth", [0, 19, 21, 7])
def test_invalid_depth_is_refused(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_v1(depth)


def test_pixel_scaling_is_inside_the_model():
    model = resnet_v1(8)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("scale").scale == pytest.approx(1 / 255)


def test_regularisation_options():
    model = resnet_v1(8, Regularization(initializer="glorot_uniform", penalty="l1", strength=1e-3, dropout=0.3))
    conv = model.get_layer("Inpt_conv")
    assert isinstance(conv.kernel_initializer, keras.initializers.GlorotUniform)
    assert isinstance(conv.kernel_regularizer, keras.regularizers.L1)
    assert model.get_layer("Dropout").rate == 0.3
    plain = resnet_v1(8, Regularization(penalty="none"))
    assert plain.get_layer("Inpt_conv").kernel_regularizer is None
    with pytest.raises(ValueError, match="penalty"):
        resnet_v1(8, Regularization(penalty="l3"))


def test_wbnrg_baseline():
    model = wbnrg()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # Convs without activation, each followed by BN and ReLU; L2(0.001) on the last two convs only.
    assert all(c.activation is keras.activations.linear for c in convs)
    assert [c.kernel_regularizer is not None for c in convs] == [False] * 4 + [True] * 2
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [0.25] * 3 + [0.5]
    assert model.output_shape == (None, 10)
    assert build_model("wbnrg").name == "wBNRg"
    with pytest.raises(ValueError, match="architecture"):
        build_model("vgg")
