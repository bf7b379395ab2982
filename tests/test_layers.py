"""FoldedConvBN equals Conv -> BatchNormalization -> ReLU6, and round-trips through config and saving."""
import numpy as np
import pytest

from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN, QuantizeConfig
from mobileqat.quantizers import ActivationQuantizer, WeightQuantizer
from mobileqat.transforms import fold_batchnorm

L = keras.layers


def _conv_bn_model(depthwise, rng, strides=1, use_bias=False):
    inp = keras.Input((9, 9, 4))
    conv = (L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=use_bias, depth_multiplier=2)
            if depthwise else L.Conv2D(6, 3, strides=strides, padding="same", use_bias=use_bias))
    x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(conv(inp)))
    model = keras.Model(inp, x)
    bn = model.layers[2]  # random, non-trivial statistics
    n = bn.gamma.shape[0]
    bn.set_weights([rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.2, 3, n)])
    return model


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("strides", [1, 2])
def test_folded_equals_conv_bn_relu6_in_inference(depthwise, strides, rng):
    model = _conv_bn_model(depthwise, rng, strides, use_bias=True)
    folded = fold_batchnorm(model)
    assert [type(layer).__name__ for layer in folded.layers] == ["InputLayer", "FoldedConvBN"]
    x = rng.normal(size=(5, 9, 9, 4)).astype(np.float32)
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), atol=2e-5)


def test_folded_training_normalises_with_batch_statistics(rng):
    model = _conv_bn_model(False, rng)
    folded = fold_batchnorm(model)
    x = rng.normal(size=(16, 9, 9, 4)).astype(np.float32) * 3 + 1
    conv, bn = model.layers[1], model.layers[2]
    expected = np.clip(bn(conv(x), training=True).numpy(), 0, 6)
    got = folded.layers[1](tf.constant(x), training=True).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_folded_weights_are_fake_quantized_per_channel(rng):
    model = _conv_bn_model(True, rng)
    folded = fold_batchnorm(model, weight_quantizer=WeightQuantizer(8))
    layer = folded.layers[1]
    w = layer.folded_kernel(training=False).numpy().reshape(3, 3, 1, 8)
    step = np.abs(w).max(axis=(0, 1, 2)) / 127
    np.testing.assert_allclose(w / step, np.round(w / step), atol=1e-3)


def test_folded_layer_round_trips_config_and_saving(tmp_path, rng):
    layer = FoldedConvBN(8, 3, strides=2, activation="relu6", weight_quantizer=WeightQuantizer(6), name="f")
    restored = FoldedConvBN.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, layer(inp))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_quantize_config_round_trips():
    config = QuantizeConfig(["kernel"], WeightQuantizer(8, False), ActivationQuantizer(8))
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(config))
    assert restored == config
