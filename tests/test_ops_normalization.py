"""LayerNormalization in int8 (layers.LayerNormCore; mobileqat.ops.normalization) against the LiteRT
interpreter, bit for bit, on both runtimes.

``quantize`` rewrites LayerNormalization(axis=-1) into ``LayerNormCore`` (six int8 ops: MEAN, SUB, MUL, MEAN,
RSQRT, MUL) and a 1x1 depthwise conv holding gamma and beta. One small QAT model is converted once. The new
kernels are checked beyond the codes the trained model reaches: the file is cut down to its single RSQRT
(every one of the 256 input codes at several input/output scales) and its single first MEAN (random codes at
several scales and zero points), the tensors' quantization rewritten in copies of the file.
"""
import numpy as np
import pytest

from mobileqat import export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.layers import LayerNormCore
from mobileqat.ops import normalization as norm
from mobileqat.quantize import audit, load_qat_model, quantize, rewrite
from mobileqat.runtime import TFLiteModel, xnnpack_coverage
from test_ops_activations import _flatbuffer, compare_ops, fit_and_export

L = keras.layers
RUNTIMES = ("reference", "xnnpack")
LN_KINDS = ("mean_last", "sub", "mul", "rsqrt", "depthwise_conv2d", "conv2d", "add")


def _random_affine(layer, seed):
    rng = np.random.default_rng(seed)
    c = layer.get_weights()[0].shape
    layer.set_weights([rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.3, c).astype(np.float32)])


def ln_net():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    c = L.Conv2D(16, 1, name="conv")(inp)
    ln = L.LayerNormalization(epsilon=1e-6, name="ln")
    n = ln(c)
    _random_affine(ln, 0)
    out = L.Add(name="add")([L.Conv2D(3, 1, name="head_a")(n), L.Conv2D(3, 1, name="head_b")(n)])
    return keras.Model(inp, out, name="ln_net")  # two users: gamma, beta in a 1x1 depthwise


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return fit_and_export(ln_net(), tmp_path_factory.mktemp("ln"), "ln")


# --- the rewrite --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6,), (5, 6), (4, 4, 6)])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False)])
def test_rewrite_keeps_the_float_function(shape, center, scale):
    inp = keras.Input(shape)
    ln = L.LayerNormalization(epsilon=1e-3, center=center, scale=scale, name="ln")
    model = keras.Model(inp, L.Activation("relu", name="act")(ln(inp)))
    if ln.weights:
        rng = np.random.default_rng(1)
        ln.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in ln.weights])
    new = rewrite(model)
    kinds = [type(layer).__name__ for layer in new.layers]
    assert "LayerNormalization" not in kinds and kinds.count("LayerNormCore") == 1
    assert sum(isinstance(layer, L.Reshape) for layer in new.layers) == (0 if len(shape) == 3 else 2)
    x = np.random.default_rng(2).normal(1.0, 3.0, (16,) + shape).astype(np.float32)
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert new.get_layer("ln").epsilon == 1e-3


def test_layer_norm_over_another_axis_is_refused_naming_the_axis():
    inp = keras.Input((4, 4, 6))
    model = keras.Model(inp, L.LayerNormalization(axis=1, name="ln_h")(inp))
    (problem,) = audit(model)
    assert problem.name == "ln_h" and "axis [1]" in problem.why and "axis=-1" in problem.fix


def test_keep_float_by_name_keeps_that_layer_normalization_float():
    inp = keras.Input((4, 4, 6))
    x = L.LayerNormalization(name="ln_a")(L.Conv2D(6, 1, name="c")(inp))
    model = keras.Model(inp, L.LayerNormalization(name="ln_b")(x))
    with pytest.warns(UserWarning, match="keeping 1 layer"):
        qat = quantize(model, keep_float=["ln_b"])
    inner = {layer.name: type(getattr(layer, "layer", layer)).__name__ for layer in qat.layers}
    assert inner["quant_ln_b"] == "LayerNormalization" and inner["quant_ln_a"] == "LayerNormCore"


def test_layer_norm_core_round_trips_config_and_keras_file(tmp_path):
    layer = LayerNormCore(epsilon=1e-5, name="core")
    again = LayerNormCore.from_config(layer.get_config())
    assert again.epsilon == 1e-5 and again.name == "core"
    model = rewrite(ln_net())
    path = str(tmp_path / "float.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    x = np.random.default_rng(3).normal(0, 1, (4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# --- the trained file ------------------------------------------------------------------------------------

def _op_names(path):
    from ai_edge_litert.interpreter import Interpreter
    return [op["op_name"] for op in Interpreter(path)._get_ops_details()]


def test_the_file_is_int8_with_six_ops_per_layer_norm(exported):
    qat, path, _, _ = exported
    assert _op_names(path)[:8] == ["CONV_2D", "MEAN", "SUB", "MUL", "MEAN", "RSQRT", "MUL", "DEPTHWISE_CONV_2D"]
    assert sorted(_op_names(path)[8:]) == ["ADD", "CONV_2D", "CONV_2D"]
    types = export.tensor_types(path)
    assert (types["input"], types["output"], types["float_ops"]) == ("int8", "int8", [])
    assert xnnpack_coverage(path)["left"] == {"RSQRT": 1}  # int8 RSQRT: the builtin kernel on both runtimes
    twin = lowering.lower(qat)
    assert [op.kind for op in twin.ops][:8] == ["conv2d", "mean_last", "sub", "mul", "mean_last", "rsqrt", "mul",
                                                "depthwise_conv2d"]
    assert provenance.first_difference(twin, path) is None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_twin_equals_the_interpreter(exported, runtime):
    qat, path, folder, x = exported
    twin = lowering.lower(qat)
    m = TFLiteModel(path, runtime)
    rng = np.random.default_rng(5)
    codes = np.concatenate([m.quantize_input(x), m.quantize_input(rng.normal(0, 6, (32, 8, 8, 3)))])
    np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes))
    compare_ops(twin, path, runtime, codes[:16], folder, kinds=LN_KINDS)


def test_qat_model_reloads_from_h5_and_lowers_the_same(exported, tmp_path):
    qat, path, _, x = exported
    file = str(tmp_path / "qat.h5")
    qat.save(file)
    again = load_qat_model(file)
    np.testing.assert_array_equal(again.predict(x[:8], verbose=0), qat.predict(x[:8], verbose=0))
    codes = TFLiteModel(path, "reference").quantize_input(x[:8])
    np.testing.assert_array_equal(lowering.lower(again).run(codes), lowering.lower(qat).run(codes))


# --- single-op files: every RSQRT code, random MEAN codes, at other scales --------------------------------

def single_op(path, dest, op_name, which=0, input_quantization=None, output_quantization=None):
    """A copy of the .tflite that runs only its ``which``-th ``op_name`` op, from that op's first input (the
    graph input) to its output (the graph output), with those tensors' (scale, zero point) replaced."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    model = _flatbuffer(path)
    g = model.subgraphs[0]
    codes = [oc.builtinCode for oc in model.operatorCodes]
    op = [o for o in g.operators if codes[o.opcodeIndex] == getattr(schema.BuiltinOperator, op_name)][which]
    g.operators, g.inputs, g.outputs = [op], [int(op.inputs[0])], [int(op.outputs[0])]
    model.signatureDefs = []
    for index, q in ((op.inputs[0], input_quantization), (op.outputs[0], output_quantization)):
        if q is not None:
            t = g.tensors[index].quantization
            t.scale, t.zeroPoint = [float(np.float32(q[0]))], [int(q[1])]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    export.write_atomic(dest, bytes(builder.Output()))
    return str(dest)


# (input scale, output scale): the variance grid of a few typical ranges, and rsqrt ranges around 1/sqrt
RSQRT_SCALES = [(0.0039, 0.05), (0.02, 0.03), (0.1, 0.0125), (1.7, 0.002), (0.00031, 0.4), (5e-5, 2.0)]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rsqrt_every_code_at_other_scales(exported, runtime):
    qat, path, folder, _ = exported
    twin = lowering.lower(qat)
    trained = [(twin.tensors[op.inputs[0]], twin.tensors[op.output]) for op in twin.ops if op.kind == "rsqrt"][0]
    cases = [((trained[0].scale, trained[0].zero_point), (trained[1].scale, trained[1].zero_point))]
    cases += [((si, zi), (so, zo)) for (si, so), zi, zo in zip(RSQRT_SCALES, [-128, -128, -100, -128, -60, -128],
                                                                [-128, 0, -128, 17, -128, -90])]
    checked = 0
    for k, (inq, outq) in enumerate(cases):
        file = single_op(path, folder / f"rsqrt_{k}.tflite", "RSQRT", input_quantization=inq,
                         output_quantization=outq)
        valid = np.arange(inq[1], 128, dtype=np.int64)  # codes below the zero point are refused by the kernel
        codes = np.resize(valid, 64 * ((len(valid) + 63) // 64)).astype(np.int8).reshape(-1, 8, 8, 1)
        want = TFLiteModel(file, runtime).invoke_raw(codes)
        got = norm.rsqrt([codes], [inq], outq)
        np.testing.assert_array_equal(got, want, err_msg=f"{runtime} RSQRT in {inq} out {outq}")
        checked += len(np.unique(want))
    assert checked > 200  # the cases reach many distinct outputs, clamps included


def test_rsqrt_refuses_codes_below_the_zero_point():
    with pytest.raises(ValueError, match="below the zero point"):
        norm.rsqrt([np.array([-5, 3], np.int8)], [(0.1, 0)], (0.05, -128))


def test_inv_sqrt_multiplier_is_close_to_the_real_value():
    """An independent check of the fixed-point Newton-Raphson: 1/sqrt(v) within 2e-6 relative."""
    for v in [2, 3, 7, 100, 255, 4096, 123457, 2 ** 28 + 5, 2 ** 30 + 1]:
        m, s = norm.inv_sqrt_multiplier(v)
        assert abs(m * 2.0 ** (s - 31) * np.sqrt(v) - 1.0) < 2e-6, v


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mean_over_channels_random_codes_at_other_scales(exported, runtime):
    qat, path, folder, _ = exported
    rng = np.random.default_rng(7)
    cases = [(None, None), ((0.05, 3), (0.01, -20)), ((0.011, -128), (0.0047, -128)), ((0.2, 100), (0.9, 5)),
             ((0.003, 0), (0.003, 0)), ((0.08, -7), (0.0031, 60))]
    for k, (inq, outq) in enumerate(cases):
        file = single_op(path, folder / f"mean_{k}.tflite", "MEAN", input_quantization=inq,
                         output_quantization=outq)
        m = TFLiteModel(file, runtime)
        ins, out = m.input_quantization, m.output_quantization
        codes = rng.integers(-128, 128, (64, 8, 8, 16)).astype(np.int8)
        codes[:8] = rng.integers(-128, -100, (8, 8, 8, 16))  # skewed rows reach the clamps and other sums
        codes[8:16] = rng.integers(100, 128, (8, 8, 8, 16))
        got = norm.KERNELS["mean_last"][runtime]([codes], [ins], out)
        np.testing.assert_array_equal(got, m.invoke_raw(codes), err_msg=f"{runtime} MEAN in {ins} out {out}")


@pytest.mark.parametrize("after", ["dense", "conv1x1", "conv_valid", "conv_same", "two_users"])
def test_gamma_and_beta_fold_into_the_layer_after_where_exact(after):
    """Into a Dense or a Conv2D with a 1x1 kernel or 'valid' padding that is the only user; otherwise (zero
    padding would see beta; a second user) a 1x1 depthwise. Same float function either way."""
    inp = keras.Input((6, 6, 5))
    ln = L.LayerNormalization(name="ln")
    n = ln(inp)
    if after == "dense":
        out = L.Dense(4, name="next")(n)
    elif after == "two_users":
        out = L.Add(name="add")([L.Conv2D(5, 1, name="next")(n), n])
    else:
        out = L.Conv2D(4, {"conv1x1": 1}.get(after, 2), strides={"conv1x1": 1}.get(after, 2),
                       padding="same" if after == "conv_same" else "valid", name="next")(n)
    model = keras.Model(inp, out)
    _random_affine(ln, 4)
    new = rewrite(model)
    kinds = [type(layer).__name__ for layer in new.layers]
    folded = after in ("dense", "conv1x1", "conv_valid")
    assert ("DepthwiseConv2D" in kinds) is not folded and "LayerNormCore" in kinds
    x = np.random.default_rng(6).normal(0.5, 2.0, (8, 6, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)


def test_linear_activations_are_dropped():
    inp = keras.Input((4, 4, 3))
    a = L.Activation("linear", name="identity")(L.Conv2D(3, 1, name="c")(inp))
    model = keras.Model(inp, L.Add(name="add")([a, inp]))
    new = rewrite(model)
    assert "identity" not in [layer.name for layer in new.layers]
    x = np.random.default_rng(8).normal(0, 1, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(new.predict(x, verbose=0), model.predict(x, verbose=0))
