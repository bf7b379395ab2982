"""numpy TFLite integer arithmetic (mobileqat.integer) vs the interpreter's reference kernels, bit for bit."""
import numpy as np
import pytest

from mobileqat import export, integer
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def test_multiply_by_quantized_multiplier_rounds_like_tflite():
    m, s = integer.quantize_multiplier(0.5)
    assert (m, s) == (1 << 30, 0)
    # ties go toward +inf (-2.5 -> -2, 2.5 -> 3): floor(v + 0.5), the same rule as TF's FakeQuant
    x = np.array([-5, -3, -1, 0, 1, 3, 5, 2 ** 20 + 1])
    np.testing.assert_array_equal(integer.multiply_by_quantized_multiplier(x, m, s), [-2, -1, 0, 0, 1, 2, 3, 524289])
    m, s = integer.quantize_multiplier(0.3)
    assert 0.3 == pytest.approx(m * 2.0 ** (s - 31), rel=1e-9)
    err = np.abs(integer.multiply_by_quantized_multiplier(np.arange(-1000, 1000), m, s) - np.arange(-1000, 1000) * 0.3)
    # double rounding (high mul, then a rounding shift by 1): up to 0.7 away from the exact product, so
    # a float simulation that rounds once can sit 1 LSB from the integer kernel
    assert err.max() == pytest.approx(0.7) and np.mean(err > 0.5 + 1e-9) > 0.05


def _export_one_layer(tmp_path, layer, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((11, 11, 6))
    qat = quantize(keras.Model(inp, L.ReLU(6.0)(L.BatchNormalization()(layer(inp)))))
    x = rng.uniform(-1, 1, (32, 11, 11, 6)).astype(np.float32)
    qat.compile("adam", "mse")
    qat.fit(x, np.asarray(qat(x)) * 1.1, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "m.tflite")
    export.export_tflite(qat, path)
    return path, x


def _run_and_find(path, x, op_name):
    """Run the file on the reference kernels keeping every tensor; the op's input and output tensors."""
    m = TFLiteModel(path, "reference", preserve_all_tensors=True)
    out = m.invoke_raw(m.quantize_input(x))
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    op = next(o for o in it._get_ops_details() if o["op_name"] in op_name)
    inputs = [dict(tensors[i], value=it.get_tensor(i)) for i in op["inputs"]]
    return out, inputs, tensors[op["outputs"][0]]


@pytest.mark.parametrize("kind,stride", [("conv", 1), ("conv", 2), ("depthwise", 1), ("depthwise", 2)])
def test_numpy_integer_op_equals_reference_kernel(tmp_path, kind, stride):
    layer = (L.Conv2D(5, 3, strides=stride, padding="same", use_bias=False) if kind == "conv"
             else L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False))
    path, x = _export_one_layer(tmp_path, layer, seed=stride)
    out, (t_in, t_w, t_b), t_out = _run_and_find(path, x, ("CONV_2D", "DEPTHWISE_CONV_2D"))
    in_scale, in_zp = t_in["quantization"]
    out_scale, out_zp = t_out["quantization"]
    fn = integer.conv2d if kind == "conv" else integer.depthwise_conv2d
    expected = fn(t_in["value"], in_scale, in_zp, t_w["value"],
                  t_w["quantization_parameters"]["scales"], t_b["value"], out_scale, out_zp,
                  stride=(stride, stride), act_range=integer.activation_range("RELU6", out_scale, out_zp))
    assert expected.shape == out.shape
    np.testing.assert_array_equal(expected, out)


def test_numpy_add_of_different_scales_equals_reference_kernel(tmp_path):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    inp = keras.Input((6, 6, 4))
    a = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 1, use_bias=False, name="a")(inp))
    b = L.BatchNormalization(name="bn_b")(L.Conv2D(4, 3, padding="same", use_bias=False, name="b")(inp))
    qat = quantize(keras.Model(inp, L.Add(name="add")([a, b])))
    x = rng.uniform(-1, 1, (32, 6, 6, 4)).astype(np.float32)
    wrapper = next(layer for layer in qat.layers if layer.name == "quant_b")
    gamma = next(w for w in wrapper.trainable_weights if "gamma" in w.name)
    gamma.assign(gamma * 5.0)  # branch b gets a much wider range than branch a
    qat.compile("adam", "mse")
    qat.fit(x, np.zeros((32, 6, 6, 4)), epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "add.tflite")
    export.export_tflite(qat, path)
    out, (t1, t2), t_out = _run_and_find(path, x, ("ADD",))
    (s1, z1), (s2, z2) = t1["quantization"], t2["quantization"]
    assert max(s1, s2) / min(s1, s2) > 2  # the case that needs rescaling
    so, zo = t_out["quantization"]
    expected = integer.add(t1["value"], s1, z1, t2["value"], s2, z2, so, zo)
    np.testing.assert_array_equal(expected, out)


def test_numpy_mean_equals_reference_kernel(tmp_path):
    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    inp = keras.Input((5, 7, 6))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(6, 3, padding="same", use_bias=False)(inp)))
    qat = quantize(keras.Model(inp, L.GlobalAveragePooling2D(name="pool")(x)))
    data = rng.uniform(-1, 1, (32, 5, 7, 6)).astype(np.float32)
    qat.compile("adam", "mse")
    qat.fit(data, np.zeros((32, 6)) + 0.5, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "mean.tflite")
    export.export_tflite(qat, path)
    out, (t_in, _axes), t_out = _run_and_find(path, data, ("MEAN",))
    (si, zi), (so, zo) = t_in["quantization"], t_out["quantization"]
    assert si != so  # the case that needs requantization
    expected = integer.mean_hw(t_in["value"], si, zi, so, zo)
    np.testing.assert_array_equal(expected, out)
    # the test can tell the two rounding paths apart: the int64 overload rounds differently here
    other = integer.mean_hw(t_in["value"], si, zi, so, zo, accumulator="int64")
    assert np.sum(other != out) > 0


def _fit_export(tmp_path, model, x, name, scale_kernel=None):
    qat = quantize(model)
    if scale_kernel is not None:  # a wider logit range than training would give
        kernel = next(v for v in qat.weights if "kernel" in v.name)
        kernel.assign(kernel * scale_kernel)
    qat.compile("adam", "mse")
    qat.fit(x, np.asarray(qat(x)), epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / name)
    export.export_tflite(qat, path)
    return path


def _run_builtin(path, x, op_name):
    """The optimized builtin kernels ("builtin") keeping every tensor: the op's input values and output."""
    m = TFLiteModel(path, "builtin", preserve_all_tensors=True)
    out = m.invoke_raw(m.quantize_input(x))
    it = m.interpreter
    op = next(o for o in it._get_ops_details() if o["op_name"] == op_name)
    return out, [it.get_tensor(i) for i in op["inputs"]], it.get_tensor(op["outputs"][0])


def test_numpy_fully_connected_equals_reference_kernel(tmp_path):
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    inp = keras.Input((12,))
    x = rng.uniform(-1, 1, (2000, 12)).astype(np.float32)
    path = _fit_export(tmp_path, keras.Model(inp, L.Dense(7, name="fc")(inp)), x[:64], "fc.tflite")
    out, (t_in, t_w, t_b), t_out = _run_and_find(path, x, ("FULLY_CONNECTED",))
    (si, zi), (so, zo) = t_in["quantization"], t_out["quantization"]
    fs = t_w["quantization_parameters"]["scales"]
    assert fs.shape == (1,)  # per-tensor Dense weights
    expected = integer.fully_connected(t_in["value"], si, zi, t_w["value"], fs, t_b["value"], so, zo)
    assert expected.shape == out.shape == (2000, 7)
    np.testing.assert_array_equal(expected, out)
    # the optimized kernel (ruy on x86) requantizes with a fixed-point multiplier: 1 LSB apart near ties
    b_out, (b_in, b_w, b_b), _ = _run_builtin(path, x, "FULLY_CONNECTED")
    np.testing.assert_array_equal(b_in, t_in["value"])
    ruy = integer.fully_connected(b_in, si, zi, b_w, fs, b_b, so, zo, kernel="ruy")
    np.testing.assert_array_equal(ruy, b_out)
    assert 0 < np.sum(ruy != expected) < 0.01 * expected.size


def test_numpy_softmax_equals_reference_and_optimized_kernels(tmp_path):
    keras.utils.set_random_seed(8)
    rng = np.random.default_rng(8)
    inp = keras.Input((12,))
    model = keras.Model(inp, L.Softmax(name="softmax")(L.Dense(10, name="fc")(inp)))
    x = rng.uniform(-1, 1, (3000, 12)).astype(np.float32)
    x *= rng.choice([0.02, 0.1, 0.3, 1.0], (len(x), 1)).astype(np.float32)  # narrow to wide logit spreads
    path = _fit_export(tmp_path, model, x[:64], "softmax.tflite", scale_kernel=20.0)
    out, (t_in,), t_out = _run_and_find(path, x, ("SOFTMAX",))
    (si, zi), (so, zo) = t_in["quantization"], t_out["quantization"]
    assert (so, zo) == (1.0 / 256, -128)
    logits = t_in["value"]
    assert logits.min() == -128 and logits.max() == 127  # the FC output saturates at both ends
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert np.sum(top2[:, 0] == top2[:, 1]) > 10  # ties for the max
    assert np.sum(out == 127) > 0 and np.mean(out == -128) > 0.3  # saturated probabilities
    np.testing.assert_array_equal(integer.softmax(logits, si, zi), out)
    # the same file on the optimized kernels: the float lookup table, fed with that run's own logits
    b_out, (b_logits,), _ = _run_builtin(path, x, "SOFTMAX")
    np.testing.assert_array_equal(integer.softmax_lut(b_logits, si, zi), b_out)


def test_numpy_softmax_reference_and_lut_on_all_input_patterns(tmp_path):
    """Input -> Softmax: the softmax reads the model's int8 input, so any codes can be fed directly."""
    keras.utils.set_random_seed(9)
    rng = np.random.default_rng(9)
    inp = keras.Input((10,))
    path = _fit_export(tmp_path, keras.Model(inp, L.Softmax()(inp)),
                       rng.uniform(-3, 3, (64, 10)).astype(np.float32), "softmax_only.tflite")
    ref, opt = TFLiteModel(path, "reference"), TFLiteModel(path, "builtin")
    assert [o["op_name"] for o in ref.interpreter._get_ops_details()] == ["SOFTMAX"]
    si, zi = ref.input_quantization
    xq = rng.integers(-128, 128, (20000, 10))
    live = rng.integers(1, 11, len(xq))
    xq[np.arange(10)[None] >= live[:, None]] = -128  # 1..10 classes above the floor
    xq[:256] = np.arange(-128, 128)[:, None]  # all ten tied
    d1, d2 = (d.ravel() for d in np.meshgrid(np.arange(256), np.arange(256)))
    three = np.full((len(d1), 10), -128)
    three[:, 0], three[:, 1], three[:, 2] = 127, 127 - d1, 127 - d2  # every pair of differences
    xq = np.concatenate([xq, three]).astype(np.int8)
    expected_ref, expected_opt = integer.softmax(xq, si, zi), integer.softmax_lut(xq, si, zi)
    np.testing.assert_array_equal(expected_ref, ref.invoke_raw(xq))
    np.testing.assert_array_equal(expected_opt, opt.invoke_raw(xq))
    np.testing.assert_array_equal(expected_ref[:256], np.full((256, 10), -102))  # 1/10: round(25.6) - 128
    # the two kernels disagree (by 1 LSB) on a few rows, so each comparison above can fail
    differ = np.any(expected_ref != expected_opt, axis=1)
    assert 10 < np.sum(differ) < 0.01 * len(xq)
    assert np.abs(expected_ref.astype(int) - expected_opt).max() == 1
