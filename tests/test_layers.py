"""FoldedConvBN equals Conv -> BatchNormalization -> ReLU6, and round-trips through config and saving."""
import numpy as np
import pytest

from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN, QuantizeConfig
from mobileqat.quantizers import ActivationQuantizer, WeightQuantizer
from mobileqat.transforms import fold_batchnorm

L = keras.layers


def _conv_bn_model(depthwise, rng, strides=1, use_bias=False, groups=1):
    inp = keras.Input((9, 9, 4))
    conv = (L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=use_bias, depth_multiplier=2)
            if depthwise else L.Conv2D(6, 3, strides=strides, padding="same", use_bias=use_bias, groups=groups))
    x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(conv(inp)))
    model = keras.Model(inp, x)
    bn = model.layers[2]  # random, non-trivial statistics
    n = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.2, 3, n)])
    return model


@pytest.mark.parametrize("depthwise,groups", [(False, 1), (True, 1), (False, 2)])
@pytest.mark.parametrize("strides", [1, 2])
def test_folded_equals_conv_bn_relu6_in_inference(depthwise, groups, strides, rng):
    model = _conv_bn_model(depthwise, rng, strides, use_bias=True, groups=groups)
    folded = fold_batchnorm(model)
    assert [type(layer).__name__ for layer in folded.layers] == ["InputLayer", "FoldedConvBN"]
    assert folded.layers[1].groups == groups
    x = rng.normal(size=(5, 9, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=2e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_folded_training_normalises_with_batch_statistics(groups, rng):
    model = _conv_bn_model(False, rng, groups=groups)
    folded = fold_batchnorm(model)
    x = rng.normal(size=(16, 9, 9, 4)).astype(np.float32) * 3 + 1
    conv, bn = model.layers[1], model.layers[2]
    expected = np.clip(bn(conv(x), training=True).numpy(), 0, 6)
    got = folded.layers[1](tf.constant(x), training=True).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_grouped_folded_training_has_the_gradients_of_one_conv_per_group(rng):
    """TensorFlow's CPU kernels have no gradient for a grouped convolution; FoldedConvBN's (through XLA) equals
    the gradient of the same function written with one ungrouped convolution per group and concatenated."""
    model = _conv_bn_model(False, rng, groups=2)
    layer = fold_batchnorm(model).layers[1]
    x = tf.constant(rng.normal(size=(8, 9, 9, 4)).astype(np.float32))
    bn = model.layers[2]
    inv = tf.math.rsqrt(bn.moving_variance + bn.epsilon)

    def per_group(x, kernel):  # the training step's function (moving statistics): conv(x, w * g / s) + bias
        w = kernel * bn.gamma * inv
        y = tf.concat([tf.nn.conv2d(x[..., 2 * g:2 * g + 2], w[..., 3 * g:3 * g + 3], 1, "SAME")
                       for g in range(2)], -1)
        return tf.clip_by_value(y + bn.beta - bn.moving_mean * bn.gamma * inv, 0, 6)

    layer.batch_statistics = False
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got = tf.reduce_sum(tf.square(layer(x, training=True)))
        expected = tf.reduce_sum(tf.square(per_group(x, layer.kernel)))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5)
    for a, b in zip(tape.gradient(got, [x, layer.kernel]), tape.gradient(expected, [x, layer.kernel])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_folded_weights_are_fake_quantized_per_channel(rng):
    model = _conv_bn_model(True, rng)
    folded = fold_batchnorm(model, weight_quantizer=WeightQuantizer(8))
    layer = folded.layers[1]
    w = layer.folded_kernel(training=False).numpy().reshape(3, 3, 1, 8)
    step = np.abs(w).max(axis=(0, 1, 2)) / 127
    np.testing.assert_allclose(w / step, np.round(w / step), atol=1e-3)


@pytest.mark.parametrize("groups,suffix", [(1, "keras"), (3, "keras"), (3, "h5")])
def test_folded_layer_round_trips_config_and_saving(tmp_path, rng, groups, suffix):
    layer = FoldedConvBN(9, 3, strides=2, activation="relu6", weight_quantizer=WeightQuantizer(6), name="f",
                         groups=groups)
    restored = FoldedConvBN.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config() and restored.groups == groups
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, layer(inp))
    assert layer.kernel.shape == (3, 3, 3 // groups, 9)
    layer.moving_variance.assign(rng.uniform(0.5, 2, 9))  # not the initial values
    path = str(tmp_path / f"m.{suffix}")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[1].groups == groups
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.parametrize("kwargs,shape,words", [
    (dict(filters=8, groups=3), (8, 8, 6), "filters=8 is not divisible by groups=3"),
    (dict(filters=6, groups=3), (8, 8, 4), "4 channels, not divisible by groups=3"),
    (dict(depthwise=True, groups=2), (8, 8, 4), "groups=1 with depthwise=True"),
])
def test_folded_layer_refuses_groups_that_do_not_divide(kwargs, shape, words):
    with pytest.raises(ValueError, match=f"FoldedConvBN 'bad'.*{words}"):
        FoldedConvBN(kernel_size=3, name="bad", **kwargs)(keras.Input(shape))


def test_quantize_config_round_trips():
    config = QuantizeConfig(["kernel"], WeightQuantizer(8, False), ActivationQuantizer(8))
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(config))
    assert restored == config
