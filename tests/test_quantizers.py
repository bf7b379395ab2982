"""Fake-quant math of mobileqat's quantizers against an independent numpy implementation."""
import numpy as np
import pytest
from conftest import numpy_fake_quant

from mobileqat._tf import keras, tf
from mobileqat.quantizers import ActivationQuantizer, FixedRangeQuantizer, WeightQuantizer


def _run(quantizer, x, training, layer=None, shape=None):
    layer = layer or keras.layers.Layer()
    weights = getattr(layer, "_qvars", None) or quantizer.build(shape or x.shape, "t", layer)
    layer._qvars = weights
    return quantizer(tf.constant(x, tf.float32), training, weights).numpy(), layer, weights


def test_weight_quantizer_per_channel_matches_numpy(rng):
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32) * np.array([0.1, 1, 3, 0.01, 7], np.float32)
    out, _, weights = _run(WeightQuantizer(8, per_channel=True), w, True)
    amax = np.abs(w).max(axis=(0, 1, 2))
    np.testing.assert_allclose(weights["max_var"].numpy(), amax, rtol=1e-6)
    np.testing.assert_allclose(out, numpy_fake_quant(w, -amax, amax, 8, narrow_range=True), atol=1e-6)
    # every channel lies on its own grid of 2*127+1 symmetric levels: integer codes, zero point 0
    codes = out / (amax / 127.0)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(np.round(codes)).max() == 127


def test_weight_quantizer_inference_uses_recorded_range(rng):
    w = rng.normal(size=(8, 4)).astype(np.float32)
    q = WeightQuantizer(4, per_channel=False)
    _, layer, weights = _run(q, w, True)
    out, _, _ = _run(q, 3 * w, False, layer)  # larger weights are clipped to the recorded range
    amax = np.abs(w).max()
    np.testing.assert_allclose(out, numpy_fake_quant(3 * w, -amax, amax, 4, narrow_range=True), atol=1e-6)


def test_activation_quantizer_starts_from_first_batch_then_ema(rng):
    q = ActivationQuantizer(8, ema_decay=0.9)
    a = rng.uniform(0.5, 3.0, size=(4, 10)).astype(np.float32)  # all positive: min is pulled to 0
    out, layer, weights = _run(q, a, True)
    assert weights["min_var"].numpy() == 0.0
    assert weights["max_var"].numpy() == pytest.approx(a.max())
    np.testing.assert_allclose(out, numpy_fake_quant(a, 0.0, a.max()), atol=1e-6)
    b = rng.uniform(-2.0, 1.0, size=(4, 10)).astype(np.float32)
    _run(q, b, True, layer)
    assert weights["min_var"].numpy() == pytest.approx(0.9 * 0 + 0.1 * b.min(), rel=1e-5)
    assert weights["max_var"].numpy() == pytest.approx(0.9 * a.max() + 0.1 * max(b.max(), 0), rel=1e-5)
    lo, hi = weights["min_var"].numpy(), weights["max_var"].numpy()
    out, _, _ = _run(q, b, False, layer)  # inference: no update, same range
    assert weights["max_var"].numpy() == hi
    np.testing.assert_allclose(out, numpy_fake_quant(b, lo, hi), atol=1e-6)


def test_fixed_range_softmax_grid_is_one_256th():
    x = np.linspace(0, 1, 1001, dtype=np.float32)
    out, _, _ = _run(FixedRangeQuantizer(), x, True)
    np.testing.assert_allclose(out * 256, np.round(out * 256), atol=1e-4)
    assert out.max() == pytest.approx(255 / 256)


def test_straight_through_gradient_inside_range_zero_outside():
    q = ActivationQuantizer(8)
    layer = keras.layers.Layer()
    weights = q.build((5,), "t", layer)
    weights["min_var"].assign(-1.0)
    weights["max_var"].assign(1.0)
    weights["seen_var"].assign(1.0)
    x = tf.constant([-2.0, -0.5, 0.0, 0.7, 3.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, False, weights)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])


@pytest.mark.parametrize("q", [WeightQuantizer(4, per_channel=False), ActivationQuantizer(6, 0.95),
                               FixedRangeQuantizer(0.0, 0.5)])
def test_quantizers_round_trip_config(q):
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q))
    assert restored == q and restored is not q


def test_bad_bits_is_a_clear_error():
    with pytest.raises(ValueError, match="num_bits=9"):
        WeightQuantizer(9)
