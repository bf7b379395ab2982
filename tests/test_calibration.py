"""PTQ through mobileqat's own path (``mobileqat.ptq`` / ``calibration``): range methods against numpy on known
distributions, the fixed (calibrated) weight range, bias correction against a numpy convolution, and tiny models
calibrated, exported as full-integer files whose scales are the calibrated ranges, and lowered at 0 LSB on the
reference kernels and XNNPACK."""
import numpy as np
import pytest
from conftest import labelled_noise as data
from conftest import numpy_fake_quant

import mobileqat as mq
from mobileqat import calibration, export, lowering
from mobileqat._tf import keras, tf
from mobileqat.lowering import quantization_params
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.quantizers import WeightQuantizer
from mobileqat.runtime import TFLiteModel

L = keras.layers


# --- range methods on known arrays ------------------------------------------------------------------------

def test_minmax_and_percentile_ranges_equal_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, 100_000)
    lo, hi = calibration.activation_range(x, "minmax")
    assert (lo, hi) == (np.float32(x.min()), np.float32(x.max()))
    lo, hi = calibration.activation_range(x, "percentile", percentile=99.9)
    assert lo == np.float32(np.percentile(x, 0.1)) and hi == np.float32(np.percentile(x, 99.9))
    # the range always contains 0 (a ReLU output: lo = 0; an all-negative tensor: hi = 0)
    assert calibration.activation_range(np.abs(x) + 1, "percentile", 99.0)[0] == 0.0
    assert calibration.activation_range(-np.abs(x) - 1, "minmax")[1] == 0.0
    w = rng.normal(0, 1, (3, 3, 4, 5)) * np.arange(1, 6)
    flat = np.abs(w).reshape(-1, 5)
    np.testing.assert_array_equal(calibration.weight_range(w, "minmax"), flat.max(0).astype(np.float32))
    np.testing.assert_array_equal(calibration.weight_range(w, "percentile", percentile=90),
                                  np.percentile(flat, 90, axis=0).astype(np.float32))
    assert calibration.weight_range(w, "minmax", per_channel=False) == np.float32(np.abs(w).max())


def _weight_mse(w, amax, bits):
    """MSE of w against TensorFlow's arithmetic (numpy, conftest) on the n-bit grid inside the int8 grid."""
    top = amax * 127.0 / (2 ** (bits - 1) - 1)
    return np.mean((numpy_fake_quant(np.clip(w, -amax, amax), -top, top, 8, narrow_range=True) - w) ** 2)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_clip_beats_minmax_on_a_laplace_sample(bits):
    rng = np.random.default_rng(1)
    w = rng.laplace(0.0, 1.0, (200_000, 1))  # scale b = 1
    amax_mse = float(calibration.weight_range(w, "mse", bits, per_channel=False, grid=200))
    amax_minmax = float(calibration.weight_range(w, "minmax", bits, per_channel=False))
    assert _weight_mse(w, amax_mse, bits) < 0.8 * _weight_mse(w, amax_minmax, bits)
    # Banner et al. 2019 (ACIQ): the MSE-optimal clip of a Laplace(b) tensor is 5.03 b at 4 bits and 9.89 b at
    # 8 bits (2^M levels); the narrow grid has one level less, so the optimum is near, not equal
    expected = {4: 5.03, 8: 9.89}[bits]
    assert 0.8 * expected < amax_mse < 1.2 * expected, amax_mse
    # and it is the best of a finer grid of clips, measured with TensorFlow's arithmetic
    fine = [_weight_mse(w, a, bits) for a in np.linspace(0.5, 1.0, 51) * amax_minmax]
    assert _weight_mse(w, amax_mse, bits) <= min(fine) * 1.01
    # activations (asymmetric 8-bit grid, TensorFlow's nudged zero point)
    x = rng.laplace(0.0, 1.0, 100_000)
    lo, hi = calibration.activation_range(x, "mse")
    lo_m, hi_m = calibration.activation_range(x, "minmax")
    err = lambda a, b: np.mean((numpy_fake_quant(x, a, b) - x) ** 2)  # noqa: E731
    assert err(lo, hi) < 0.9 * err(lo_m, hi_m)  # 8 bits: the tails of 100k samples cost less


def test_unknown_method_and_bad_percentile_are_refused():
    with pytest.raises(ValueError, match="method='kl' is not a calibration method.*minmax"):
        calibration.activation_range(np.ones(4), "kl")
    with pytest.raises(ValueError, match="percentile=101"):
        calibration.weight_range(np.ones((2, 2)), "percentile", percentile=101)


def test_a_fixed_range_weight_quantizer_keeps_and_clips_to_its_range():
    rng = np.random.default_rng(2)
    w = rng.laplace(0, 1, (3, 3, 2, 4)).astype(np.float32)
    layer = L.Layer()
    q = WeightQuantizer(4, fixed_range=True)
    qvars = q.build(w.shape, "kernel", layer)
    amax = (np.abs(w).reshape(-1, 4).max(0) * 0.5).astype(np.float32)
    qvars["max_var"].assign(amax)
    for training in (True, False):
        got = q(tf.constant(w), training, qvars).numpy()
        np.testing.assert_array_equal(qvars["max_var"].numpy(), amax)  # not recorded in training
        top = amax * np.float32(127.0 / 7)
        np.testing.assert_allclose(got, numpy_fake_quant(np.clip(w, -amax, amax), -top, top, 8, True),
                                   rtol=0, atol=1e-6)
    assert WeightQuantizer.from_config(q.get_config()) == q and q.get_config()["fixed_range"] is True
    assert "fixed_range" not in WeightQuantizer(4).get_config()  # configs of existing models unchanged


# --- models ---------------------------------------------------------------------------------------------

def float_net():
    """16x16x3 -> 5, trained for a few steps: stem conv+BN+ReLU6 (stride 2), depthwise+BN+ReLU6, 1x1
    projection+BN, Add, Conv2D with bias and ReLU, GAP, Dense, softmax."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization()(
        L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(8, 1, activation="relu", name="plain")(x)
    x = L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Activation("softmax", name="probs")(x), name="calib_net")
    x, y = data(128, 7)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def model():
    return float_net()


@pytest.fixture(scope="module", params=[("w8a8", "percentile"), ("w4a8", "mse")], ids=lambda p: "-".join(p))
def exported(request, model, tmp_path_factory):
    scheme, method = request.param
    calib = data(96, 8)[0]
    qat = quantize(model, scheme)
    report = calibration.calibrate(qat, calib, method, bias_correction=True)
    path = str(tmp_path_factory.mktemp("calib") / f"{scheme}_{method}.tflite")
    export.export_tflite(qat, path)
    return qat, report, path, scheme


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_ptq_files_match_the_integer_twin_at_0_lsb(exported, runtime):
    qat, _, path, _ = exported
    x = data(48, 9)[0]
    f = TFLiteModel(path, runtime)
    codes = f.quantize_input(x)
    out = np.concatenate([f.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), out)
    assert export.tensor_types(path)["float_ops"] == []


def _file_tensors(path):
    """{op name fragment 'quant_<layer>/': (output tensor details, weight tensor details or None)}."""
    it = TFLiteModel(path, "reference").interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = {}
    for op in it._get_ops_details():
        name = tensors[op["outputs"][0]]["name"]
        weights = tensors[op["inputs"][1]] if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                                "FULLY_CONNECTED") else None
        out[name] = (tensors[op["outputs"][0]], weights, it)
    return out, it


def test_the_files_scales_are_the_calibrated_ranges(exported):
    qat, report, path, scheme = exported
    bits = 8 if scheme == "w8a8" else 4
    ops, it = _file_tensors(path)
    checked = 0
    for layer in ("stem", "dw", "proj", "plain", "logits"):
        hits = [k for k in ops if f"quant_{layer}/" in k]
        assert len(hits) == 1, (layer, list(ops))
        out, weights, _ = ops[hits[0]]
        amax = np.float32(report["weights"][f"quant_{layer}"])
        # the step of the n-bit grid over [-amax, amax]: amax / (2^(n-1) - 1), int8 tensor or packed INT4
        expected = [quantization_params(-a, a, bits, narrow_range=True)[0] for a in np.atleast_1d(amax)]
        np.testing.assert_allclose(weights["quantization_parameters"]["scales"], expected, rtol=1e-6, err_msg=layer)
        scale, zp = quantization_params(*report["activations"][f"quant_{layer}"])
        assert out["quantization_parameters"]["scales"][0] == pytest.approx(scale, rel=1e-6), layer
        assert out["quantization_parameters"]["zero_points"][0] == zp, layer
        checked += 1
    assert checked == 5
    inp = it.get_input_details()[0]["quantization"]
    (key,) = [k for k in report["activations"] if k.startswith("quantize_layer")]
    assert inp[0] == pytest.approx(quantization_params(*report["activations"][key])[0], rel=1e-6)


def test_minmax_ranges_are_the_float_models_extremes(model):
    """minmax ranges against the float Keras model's own tensors (not the folded twin that calibrate runs)."""
    x = data(64, 10)[0]
    qat = quantize(model, "w8a8")
    report = calibration.calibrate(qat, x, "minmax", batch_size=20)
    stem = keras.Model(model.input, model.get_layer("stem_relu").output).predict(x, verbose=0)
    np.testing.assert_allclose(report["activations"]["quant_stem"], [0.0, stem.max()], rtol=1e-5)
    (key,) = [k for k in report["activations"] if k.startswith("quantize_layer")]
    assert report["activations"][key] == [float(np.float32(x.min())), float(np.float32(x.max()))]
    # weights: max |folded kernel| per output channel (kernel * gamma / sqrt(var + eps))
    bn = model.layers[2]
    folded = model.get_layer("stem").kernel.numpy() * (bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy()
                                                                                   + bn.epsilon))
    np.testing.assert_allclose(report["weights"]["quant_stem"], np.abs(folded).reshape(-1, 8).max(0), rtol=1e-5)


# --- bias correction -------------------------------------------------------------------------------------

def _conv_valid(x, w):
    """numpy 'valid' convolution, stride 1: x (N, H, W, C), w (kh, kw, C, O) -> (N, H-kh+1, W-kw+1, O)."""
    kh, kw = w.shape[:2]
    n, h, wd, _ = x.shape
    out = np.zeros((n, h - kh + 1, wd - kw + 1, w.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h - kh + 1, j:j + wd - kw + 1], w[i, j])
    return out


def test_bias_correction_removes_the_mean_output_error_of_a_layer():
    keras.utils.set_random_seed(3)
    inp = keras.Input((10, 10, 3))
    conv = L.Conv2D(6, 3, padding="valid", name="conv")
    x = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(conv(inp)))
    model = keras.Model(inp, x)
    rng = np.random.default_rng(4)
    # a skewed kernel and inputs with a non-zero mean: rounding errors do not average out
    conv.kernel.assign(rng.laplace(0.05, 0.3, conv.kernel.shape).astype(np.float32))
    conv.bias.assign(rng.normal(0, 0.1, 6).astype(np.float32))
    calib = rng.uniform(0.0, 1.0, (64, 10, 10, 3)).astype(np.float32)
    held_out = rng.uniform(0.0, 1.0, (64, 10, 10, 3)).astype(np.float32)
    w, b = conv.kernel.numpy().astype(np.float64), conv.bias.numpy().astype(np.float64)

    errors = {}
    for bc in (False, True):
        qat = mq.ptq(model, calib, "w4a8", method="minmax", bias_correction=bc)
        wrapper = qat.get_layer("quant_conv")
        var, q, qvars = wrapper._weight_vars[0]
        amax = qvars["max_var"].numpy()
        top = amax * np.float32(127.0 / 7)
        qw = numpy_fake_quant(np.clip(w, -amax, amax), -top, top, 8, narrow_range=True)
        (inq,) = [la for la in qat.layers if type(la).__name__ == "QuantizeLayer"]
        lo, hi = inq.quantizer_vars["min_var"].numpy(), inq.quantizer_vars["max_var"].numpy()
        qb = wrapper.layer.bias.numpy().astype(np.float64)
        errors[bc] = {}
        for name, x in (("calibration", calib), ("held_out", held_out)):
            xq = numpy_fake_quant(x, lo, hi)  # the conv's input in the quantized model
            float_out = _conv_valid(xq, w) + b
            quant_out = _conv_valid(xq, qw) + qb
            errors[bc][name] = np.abs((float_out - quant_out).mean(axis=(0, 1, 2)))
        if bc:  # the correction is E[(W - Q(W)) x] on the calibration set
            xq = numpy_fake_quant(calib, lo, hi)
            np.testing.assert_allclose(qb - b, (_conv_valid(xq, w - qw)).mean(axis=(0, 1, 2)), atol=1e-5)
    assert errors[False]["calibration"].max() > 1e-3
    assert errors[True]["calibration"].max() < 1e-5
    assert errors[True]["held_out"].mean() < 0.2 * errors[False]["held_out"].mean()


# --- API: errors, saving, fine-tuning ---------------------------------------------------------------------

def test_ptq_errors_name_the_thing_and_the_fix(model):
    with pytest.raises(ValueError, match="calibration set for model 'calib_net' is empty.*calibration_subset"):
        mq.ptq(model, np.zeros((0, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8, 3\) does not fit the input of model 'calib_net' "
                                         r"\(None, 16, 16, 3\)"):
        mq.ptq(model, np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="method='entropy' is not a calibration method"):
        mq.ptq(model, np.zeros((4, 16, 16, 3), np.float32), method="entropy")
    with pytest.raises(ValueError, match="has no quantizers; give the float model to mobileqat.ptq"):
        calibration.calibrate(model, np.zeros((4, 16, 16, 3), np.float32))


def test_a_calibrated_model_saves_reloads_and_fine_tunes_with_its_ranges(model, tmp_path):
    x, y = data(64, 11)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # a tf.data calibration set
    qat = mq.ptq(model, ds, "w4a8", method="mse", bias_correction=True)
    qat.save(tmp_path / "ptq.h5")
    loaded = load_qat_model(tmp_path / "ptq.h5")
    wq = loaded.get_layer("quant_stem").layer.weight_quantizer
    assert wq.fixed_range and wq.num_bits == 4
    x_codes = lowering.lower(qat).quantize_input(x[:8])
    np.testing.assert_array_equal(lowering.lower(loaded).run(x_codes, "xnnpack"),
                                  lowering.lower(qat).run(x_codes, "xnnpack"))
    before = {v.name: v.numpy() for v in loaded.weights if "kernel_max" in v.name}
    assert before
    loaded.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    loaded.fit(x, y, epochs=1, batch_size=32, verbose=0)
    for v in loaded.weights:
        if v.name in before:
            np.testing.assert_array_equal(v.numpy(), before[v.name], err_msg=v.name)
