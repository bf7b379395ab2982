"""Weightless custom layers and Lambda layers (tfmot #957, #638) become the TF ops their call runs
(``transforms.inline_custom_layers``), scalar-constant ops on images a fixed per-channel affine
(``transforms.scalar_ops_to_affine``): same float function (checked against the original Keras model),
and the quantized model's file matches the integer twin at 0 LSB on both runtimes. What still cannot be
int8 is refused naming the user's layer and class."""
import numpy as np
import pytest

from conftest import assert_twin_matches_file
from mobileqat import transforms
from mobileqat._tf import keras, tf
from mobileqat.quantize import quantize, rewrite

L = keras.layers


class Mix(L.Layer):
    """relu(x) * 0.5 + 1 - x / 4, no weights."""

    def call(self, x):
        return tf.nn.relu(x) * 0.5 + 1.0 - x / 4.0


class Cosine(L.Layer):
    def call(self, x):
        return tf.math.cos(x)


class Center(L.Layer):
    """x - mean(x) over the whole tensor: inlined, its tf.reduce_mean has no int8 mapping here."""

    def call(self, x):
        return x - tf.reduce_mean(x)


class Gain(L.Layer):
    def build(self, shape):
        self.g = self.add_weight("g", (int(shape[-1]),), initializer="ones")

    def call(self, x):
        return x * self.g


def net(middle):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(inp)))
    x = middle(x)
    return keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(x)))


def _x(n=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("middle", [lambda: Mix(name="mix"), lambda: L.Lambda(lambda t: t * 2.0 - 0.5, name="lam")])
def test_inlined_layer_keeps_the_function_and_its_twin_matches_the_file(tmp_path, middle):
    m = net(middle())
    r = rewrite(m)
    assert not {type(la).__name__ for la in r.layers} & {"Mix", "Lambda", "TFOpLambda"}
    x = _x()
    np.testing.assert_allclose(r.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
    q = quantize(m)
    q(x, training=True)
    assert_twin_matches_file(q, x, tmp_path / "m.tflite")


def test_scalar_ops_become_a_fixed_affine_with_the_same_function():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inp)
    m = keras.Model(inp, (x - 1.0) / 4.0 * 3.0 + 2.0)
    r = transforms.scalar_ops_to_affine(m)
    kinds = [type(la).__name__ for la in r.layers]
    assert "TFOpLambda" not in kinds and kinds.count("DepthwiseConv2D") == 4
    assert not any(la.trainable for la in r.layers if type(la).__name__ == "DepthwiseConv2D")
    x = _x(4)
    np.testing.assert_allclose(r.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("middle,words", [
    (lambda: Cosine(name="cos_layer"), "layer 'cos_layer' (Cosine)"),
    (lambda: Gain(name="gain"), "layer 'gain' (Gain)"),
    (lambda: Center(name="center"), "layer 'center' (Center)"),
])
def test_what_cannot_be_int8_is_refused_by_the_users_name_and_class(middle, words):
    with pytest.raises(ValueError, match="cannot quantize") as e:
        quantize(net(middle()))
    assert words in str(e.value) and "Traceback" not in str(e.value)
