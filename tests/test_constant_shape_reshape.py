"""Keras' Reshape builds its shape from the batch size: the converter writes SHAPE, STRIDED_SLICE and PACK in front
of each RESHAPE and XNNPACK takes none of them. ``transforms.constant_shape_reshapes`` gives every Reshape a
constant shape (-1 for the batch): same function as the original Keras model, XNNPACK takes every op but the
SOFTMAX (counted by the runtime), the integer twin matches the file at 0 LSB on both runtimes, and the layer
round-trips through get_config and Keras saving (.h5, SavedModel: same weights, outputs and file)."""
import numpy as np
import pytest

from conftest import assert_twin_matches_and_xnnpack_takes_all_but_softmax
from mobileqat import coverage, transforms
from mobileqat._tf import keras
from mobileqat.layers import ConstantShapeReshape
from mobileqat.quantize import quantize

L = keras.layers


def reshape_net():
    """tf_keras MobileNet's head (pool, Reshape to (1, 1, C), 1x1 conv, Reshape to (classes,)) and a Reshape
    with -1 in its target (a feature map seen as a longer, thinner one)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inp)))
    x = L.Reshape((-1, 4, 8), name="taller")(x)  # (16, 4, 8)
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, use_bias=False)(x)))
    x = L.Reshape((1, 1, 16), name="to_1x1")(L.GlobalAveragePooling2D()(x))
    x = L.Conv2D(5, 1, name="logits")(x)
    return keras.Model(inp, L.Softmax()(L.Reshape((5,), name="to_vector")(x)))


def _x(n=16):
    return np.random.default_rng(0).uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)


def test_rewrite_keeps_the_function_and_writes_constant_shapes():
    m = reshape_net()
    r = transforms.constant_shape_reshapes(m)
    for name, shape in (("taller", (16, 4, 8)), ("to_1x1", (1, 1, 16)), ("to_vector", (5,))):
        layer = r.get_layer(name)
        assert type(layer) is ConstantShapeReshape and layer.target_shape == shape
        assert transforms.rewritten_from(layer) == "Reshape"
    np.testing.assert_array_equal(r.predict(_x(), verbose=0), m.predict(_x(), verbose=0))
    assert transforms.constant_shape_reshapes(r) is r  # nothing left to rewrite
    with pytest.raises(ValueError, match="target_shape"):
        ConstantShapeReshape((-1, 4))


def test_file_is_fully_delegated_and_its_twin_matches(tmp_path):
    assert_twin_matches_and_xnnpack_takes_all_but_softmax(quantize(reshape_net()), _x(32), tmp_path / "reshape.tflite")


def test_round_trips_through_config_and_saving(tmp_path):
    layer = ConstantShapeReshape((1, 1, 16), name="r")
    again = ConstantShapeReshape.from_config(layer.get_config())
    assert again.target_shape == (1, 1, 16) and again.name == "r"
    q = quantize(reshape_net())
    assert coverage._saving(q, _x(), str(tmp_path), "reshape") == {".h5": "ok", "savedmodel": "ok"}
