"""Weight ranges at or near zero: a dead channel (all-zero weights) and a learned LSQ step pushed below its floor or
through zero. The converter widens a FakeQuant range no wider than 1e-6 to [-5e-7, 5e-7] (ExpandVerySmallRange);
the integer twin must do the same, or its scales (0, or 1e-10) and bias codes differ from the file's. A negative
LSQ step acts as its absolute value, so the channel keeps its grid and its gradient."""
import numpy as np
import pytest

from conftest import assert_twin_matches_file
from mobileqat import lowering, provenance
from mobileqat._tf import keras, tf
from mobileqat.quantize import quantize
from mobileqat.quantizers import LSQWeightQuantizer
from mobileqat.runtime import TFLiteModel

L = keras.layers


def _net():
    """16x16x3 -> 3: conv+BN+ReLU6 (8 channels), Conv2D with bias (6), GAP, Dense(3)."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                                                     name="stem")(inp)))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="plain")(x)
    x = L.Dense(3, name="fc")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, x, name="degenerate")


def _images(n=16):
    return np.random.default_rng(0).uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)


def _file_scales(path, layer):
    it = TFLiteModel(str(path), "reference").interpreter
    for t in it.get_tensor_details():
        if t["name"].startswith(f"degenerate/quant_{layer}/") and len(t["shape"]) == 4 and t["shape"][0] != 1:
            return np.asarray(t["quantization_parameters"]["scales"], np.float64)
    raise AssertionError(f"no weight tensor of {layer}")


def test_the_converter_widens_a_near_zero_range_and_the_twin_does_too():
    """quantization_params against the converter's rule (numpy): [0, 0] and [-1e-8, 1e-8] narrow 8-bit become
    [-5e-7, 5e-7], scale 1e-6 / 254; a range just wider than 1e-6 is kept."""
    for lo, hi in ((0.0, 0.0), (-1e-8, 1e-8), (-4e-7, 4e-7)):
        scale, zp = lowering.quantization_params(lo, hi, 8, narrow_range=True)
        assert scale == pytest.approx(1e-6 / 254, rel=1e-12) and zp == 0
    wide = float(np.float32(6e-7))
    scale, _ = lowering.quantization_params(-wide, wide, 8, narrow_range=True)
    assert scale == pytest.approx(2 * wide / 254, rel=1e-12)


def test_a_dead_channel_of_min_max_weights_matches_the_file(tmp_path):
    """Two output channels of zero weights (stem after folding, plain before): the file's scale for them is
    1e-6 / 254, the twin holds the file's weights, filter scales and bias codes, and gives its output codes on
    both runtimes (the output codes alone would not notice: the channel contributes ~0 at either scale)."""
    model = _net()
    stem = model.get_layer("stem")
    k = stem.kernel.numpy()
    k[..., [1, 5]] = 0.0
    stem.kernel.assign(k)
    plain = model.get_layer("plain")
    k = plain.kernel.numpy()
    k[..., 2] = 0.0
    plain.kernel.assign(k)
    qat = quantize(model, "w8a8")
    x = _images()
    qat(x, training=True)
    path = tmp_path / "dead.tflite"
    assert_twin_matches_file(qat, x, path)
    assert provenance.first_difference(lowering.lower(qat), str(path)) is None  # weights, filter scales, bias
    assert _file_scales(path, "stem")[[1, 5]] == pytest.approx(1e-6 / 254, rel=1e-6)
    assert _file_scales(path, "plain")[2] == pytest.approx(1e-6 / 254, rel=1e-6)


def _lsq_vars(qat, layer):
    wrapper = qat.get_layer(f"quant_{layer}")
    inner = wrapper.layer
    if hasattr(inner, "_wq_vars"):
        return inner.weight_quantizer, inner._wq_vars
    return wrapper._weight_vars[0][1:]


def test_lsq_steps_below_the_floor_or_negative_match_the_file(tmp_path):
    """LSQ weights, steps set by hand: stem channel 0 at 1e-12 (below the 1e-10 floor: range 1.27e-8, widened by
    the converter), channel 1 negative (acts as |step|), plain channel 3 negative. The forward pass with the
    negative step equals the one with |step|, and the twin gives the file's codes on both runtimes."""
    qat = quantize(_net(), {"weight_bits": 4, "weight_method": "lsq"})
    x = _images()
    qat(x, training=True)  # data initialisation of every step and range
    q, v = _lsq_vars(qat, "stem")
    assert isinstance(q, LSQWeightQuantizer)
    step = v.step.numpy()
    step[0], step[1] = 1e-12, -step[1]
    v.step.assign(step)
    w = qat.get_layer("quant_stem").layer.folded_float_kernel()
    negative = q(w, False, v).numpy()
    v.step.assign(np.abs(step))
    np.testing.assert_array_equal(negative, q(w, False, v).numpy())
    v.step.assign(step)
    q2, v2 = _lsq_vars(qat, "plain")
    s2 = v2.step.numpy()
    s2[3] = -s2[3]
    v2.step.assign(s2)
    path = tmp_path / "lsq.tflite"
    assert_twin_matches_file(qat, x, path)
    assert provenance.first_difference(lowering.lower(qat), str(path)) is None  # weights, filter scales, bias
    assert _file_scales(path, "stem")[0] == pytest.approx(1e-6 / 254, rel=1e-6)


def test_a_negative_lsq_step_still_gets_a_gradient():
    """d loss / d step through |step|: nonzero for a negative step, the opposite sign of the positive one's."""
    q = LSQWeightQuantizer(4, per_channel=False)
    w = tf.constant(np.random.default_rng(1).normal(size=(3, 3, 2, 4)).astype(np.float32))

    class Vars:
        step = tf.Variable(0.05)
        initialized = tf.Variable(1.0)

    grads = []
    for s in (0.05, -0.05):
        Vars.step.assign(s)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(q(w, True, Vars) * w)
        grads.append(float(tape.gradient(loss, Vars.step)))
    assert grads[0] != 0 and grads[1] == pytest.approx(-grads[0], rel=1e-6)
