"""Conv1D and 1D pools (tfmot #1145): ``transforms.layers_1d_to_2d`` writes them as their 2D layers over
(N, 1, L, C), same float function (checked against the original Keras model), then they quantize, export to
full int8 and the integer twin matches the file at 0 LSB on the reference kernels and XNNPACK."""
import numpy as np
import pytest

from conftest import assert_twin_matches_file
from mobileqat import export, transforms
from mobileqat._tf import keras
from mobileqat.quantize import quantize

L = keras.layers


def net(padding="same", strides=1, keepdims=False, sequence_input=False):
    """(N, 24, 6) sequences, or (N, 8, 9, 4) images read as 24 rows of 12 values -> 5 classes."""
    keras.utils.set_random_seed(0)
    if sequence_input:
        inp = keras.Input((24, 6))
        x = inp
    else:
        inp = keras.Input((8, 9, 4))
        x = L.Reshape((24, 12))(inp)
    x = L.ReLU()(L.Conv1D(8, 3, padding=padding, strides=strides, name="c1")(x))
    x = L.MaxPooling1D(2, name="mp")(x)
    x = L.Conv1D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = L.AveragePooling1D(2, padding="same", name="ap")(x)
    x = L.GlobalAveragePooling1D(keepdims=keepdims, name="gap")(x)
    if keepdims:
        x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(5, activation="softmax", name="fc")(x))


def _x(model, n=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + tuple(model.input_shape[1:])).astype(np.float32)


@pytest.mark.parametrize("padding,strides,keepdims", [("same", 1, False), ("valid", 2, True), ("causal", 1, False)])
def test_rewrite_keeps_the_function(padding, strides, keepdims):
    m = net(padding, strides, keepdims)
    r = transforms.layers_1d_to_2d(m)
    kinds = {type(layer).__name__ for layer in r.layers}
    assert not kinds & {"Conv1D", "MaxPooling1D", "AveragePooling1D", "GlobalAveragePooling1D"}
    assert r.get_layer("c1").kernel.shape == (1, 3, 12, 8)
    x = _x(m)
    np.testing.assert_allclose(r.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
    assert ("ZeroPadding2D" in kinds) == (padding == "causal")


@pytest.mark.parametrize("sequence_input", [False, True])
def test_conv1d_model_quantizes_and_its_twin_matches_the_file(tmp_path, sequence_input):
    m = net("causal" if sequence_input else "same", sequence_input=sequence_input)
    q = quantize(m)
    x = _x(m, 64)
    q(x, training=True)  # ranges from one batch
    path = tmp_path / "c1d.tflite"
    assert_twin_matches_file(q, x, path)
    assert export.tensor_types(path)["float_ops"] == []


def test_dilated_conv1d_is_refused_by_name():
    keras.utils.set_random_seed(0)
    inp = keras.Input((24, 6))
    out = L.GlobalAveragePooling1D()(L.Conv1D(4, 3, dilation_rate=2, name="dil")(inp))
    with pytest.raises(ValueError, match=r"layer 'dil' \(Conv1D\): dilation_rate=\(1, 2\)"):
        quantize(keras.Model(inp, out))
