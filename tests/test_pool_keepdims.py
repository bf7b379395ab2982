"""Squeeze-excite written as GlobalAveragePooling2D + Reshape((1, 1, C)) (tf_keras EfficientNet):
``transforms.pool_reshape_to_keepdims`` makes it the pool with keepdims=True. Same float function (against
the original Keras model); the int8 file then has no RESHAPE / SHAPE / STRIDED_SLICE / PACK and XNNPACK takes
every op but the SOFTMAX (counted by the runtime); the integer twin matches the file at 0 LSB on both
runtimes."""
import numpy as np

from conftest import assert_twin_matches_and_xnnpack_takes_all_but_softmax
from mobileqat import transforms
from mobileqat._tf import keras
from mobileqat.quantize import quantize

L = keras.layers


def se_net():
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    for i, pool in enumerate((L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        se = L.Reshape((1, 1, 16), name=f"se{i}_reshape")(pool(name=f"se{i}_squeeze")(x))
        se = L.Conv2D(16, 1, activation="sigmoid", name=f"se{i}_expand")(L.Conv2D(4, 1, activation="relu")(se))
        x = L.Multiply(name=f"se{i}_excite")([x, se])
    return keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(x)))


def _x(n=16):
    return np.random.default_rng(0).uniform(-1, 1, (n, 12, 12, 3)).astype(np.float32)


def test_rewrite_keeps_the_function_and_drops_the_reshapes():
    m = se_net()
    r = transforms.pool_reshape_to_keepdims(m)
    assert not any(isinstance(layer, L.Reshape) for layer in r.layers)
    assert r.get_layer("se0_squeeze").keepdims and r.get_layer("se1_squeeze").keepdims
    np.testing.assert_allclose(r.predict(_x(), verbose=0), m.predict(_x(), verbose=0), atol=1e-6)
    inp = keras.Input((6, 6, 16))  # the pooled vector has another user: left as it is
    pooled = L.GlobalAveragePooling2D()(inp)
    other = keras.Model(inp, [L.Reshape((1, 1, 16))(pooled), L.Dense(2)(pooled)])
    assert transforms.pool_reshape_to_keepdims(other) is other


def test_file_is_fully_delegated_and_its_twin_matches(tmp_path):
    assert_twin_matches_and_xnnpack_takes_all_but_softmax(quantize(se_net()), _x(32), tmp_path / "se.tflite")
