"""Activation ops (mobileqat.ops.activations) against the LiteRT interpreter, bit for bit, on both
runtimes: LOGISTIC, TANH, RELU and RELU6 on their own, ReLU/ReLU6 fused into an ADD, HARD_SWISH,
MobileNetV3's hard sigmoid (ADD of 3 with a fused RELU6, MUL by 1/6) and swish (LOGISTIC, MUL).

One small QAT model (fitted briefly, so its ranges are real) is converted once. Most activations read
the model input directly, so feeding every int8 code checks them on their whole domain; rewriting the
input tensor's scale and zero point in the file (no new conversion) moves them to other scales, to
rounding ties and to cases where the two runtimes' tables differ. XNNPACK keeps no intermediate
tensors: its per-op values come from copies of the file whose graph output is that op's tensor.
"""
import dataclasses

import numpy as np
import pytest

from mobileqat import export, lowering, provenance, transforms
from mobileqat._tf import keras, tf
from mobileqat.layers import HardSigmoid, HardSwish
from mobileqat.ops import activations as act
from mobileqat.quantize import audit, load_qat_model, quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers
RUNTIMES = ("reference", "xnnpack")
ACTIVATION_KINDS = ("logistic", "tanh", "relu", "relu6", "hard_swish", "add_const", "mul_const", "swish_mul")


def activation_net():
    """Activations on the input itself (all codes reach them), ReLU fused into an ADD (a1), a standalone
    ReLU after an ADD with two users (a2), a conv and its swish (a ReLU fused into its MUL), and a ReLU6
    fused into the last ADD.
    (Swish does not read the input: the converter would merge its LOGISTIC with the sigmoid's.)"""
    inp = keras.Input((8, 8, 3))
    r6 = L.ReLU(6.0, name="r6")(inp)
    s = L.Activation("sigmoid", name="sig")(inp)
    t = L.Activation("tanh", name="tanh")(inp)
    h = HardSwish(name="hswish")(inp)
    g = HardSigmoid(name="hsig")(inp)
    c = L.BatchNormalization(name="c_bn")(L.Conv2D(3, 1, use_bias=False, name="c")(r6))
    w = L.ReLU(name="swish_relu")(L.Activation("swish", name="swish")(c))
    a1 = L.ReLU(name="a1_relu")(L.Add(name="a1")([s, t]))
    a2 = L.Add(name="a2")([h, g])
    a3 = L.Add(name="a3")([a2, w])
    a4 = L.Add(name="a4")([a1, L.ReLU(name="a2_relu")(a2)])
    return keras.Model(inp, L.ReLU(6.0, name="out_relu6")(L.Add(name="a5")([a4, a3])), name="activation_net")


def all_codes():
    """(3, 8, 8, 3) int8: every code -128..127 (and again) in the first two images, random codes in the third."""
    every = np.resize(np.arange(-128, 128), 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    other = np.random.default_rng(1).integers(-128, 128, (1, 8, 8, 3))
    return np.concatenate([every, other]).astype(np.int8)


def fit_and_export(model, folder, name):
    """Quantize ``model`` ((8, 8, 3) -> (8, 8, 3)), fit one epoch on seeded noise, export ``folder/name.tflite``:
    (qat, path, folder, x)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (64, 8, 8, 3)).astype(np.float32)
    qat = quantize(model)
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    qat.fit(x, rng.normal(0, 1, (64, 8, 8, 3)), epochs=1, batch_size=16, verbose=0)
    path = str(folder / f"{name}.tflite")
    export.export_tflite(qat, path)
    return qat, path, folder, x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return fit_and_export(activation_net(), tmp_path_factory.mktemp("activations"), "act")


def _flatbuffer(path):
    from ai_edge_litert import schema_py_generated as schema
    with open(path, "rb") as f:
        return schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)


def rewritten(path, dest, input_quantization=None, output=None):
    """A copy of the .tflite with the input tensor's (scale, zero point) and/or the graph output replaced."""
    import flatbuffers
    model = _flatbuffer(path)
    graph = model.subgraphs[0]
    if input_quantization is not None:
        q = graph.tensors[graph.inputs[0]].quantization
        q.scale, q.zeroPoint = [float(np.float32(input_quantization[0]))], [int(input_quantization[1])]
    if output is not None:
        graph.outputs = [int(output)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    export.write_atomic(dest, bytes(builder.Output()))
    return str(dest)


def with_input(twin, scale, zero_point):
    """The twin with another input quantization (as ``rewritten`` gives the file)."""
    tensors = dict(twin.tensors)
    tensors[twin.input.name] = dataclasses.replace(twin.input, scale=np.float32(scale), zero_point=int(zero_point))
    return lowering.IntegerModel(tensors, twin.ops, twin.input.name, twin.output.name)


def op_tensors(twin, path):
    """{twin op: index of the file tensor it computes}, matched by data flow as provenance does."""
    mapped = provenance.file_tensors(twin, path)
    return [(op, int(mapped[op.output])) for op in twin.ops if op.kind in lowering.TFLITE_OPS]


def interpreter_values(path, runtime, codes, indices, folder):
    """{file tensor index: int8 values} computed by ``runtime`` from the int8 input ``codes``."""
    if runtime == "reference":
        m = TFLiteModel(path, "reference", preserve_all_tensors=True)
        m.invoke_raw(codes)
        return {i: m.interpreter.get_tensor(i) for i in indices}
    return {i: TFLiteModel(rewritten(path, folder / f"out_{i}.tflite", output=i), "xnnpack").invoke_raw(codes)
            for i in indices}


def compare_ops(twin, path, runtime, codes, folder, kinds=ACTIVATION_KINDS):
    """Every op of ``kinds``: the twin's values (chained from ``codes`` in ``runtime``'s arithmetic) equal
    the interpreter's. Returns {op output: (twin values, interpreter values)}."""
    pairs = [(op, i) for op, i in op_tensors(twin, path) if op.kind in kinds]
    got = interpreter_values(path, runtime, codes, [i for _, i in pairs], folder)
    mine = twin.run(codes, runtime, keep_all=True)
    for op, i in pairs:
        np.testing.assert_array_equal(mine[op.output], got[i], err_msg=f"{runtime} {op.kind} '{op.output}'")
    return {op.output: (mine[op.output], got[i]) for op, i in pairs}


# --- the trained model ----------------------------------------------------------------------------------

def test_twin_is_the_file_op_by_op(exported):
    qat, path, _, _ = exported
    twin = lowering.lower(qat)
    assert provenance.first_difference(twin, path) is None
    kinds = [(op.kind, op.params.get("activation")) for op in twin.ops]
    assert set(ACTIVATION_KINDS) <= {kind for kind, _ in kinds}
    # X -> ReLU/ReLU6 (its only user): one op X with a fused activation and the ReLU's range
    assert {("add", "RELU"), ("add", "RELU6"), ("swish_mul", "RELU")} <= set(kinds)
    fused = next(op for op in twin.ops if op.kind == "add" and op.params.get("activation") == "RELU")
    assert fused.output == "quant_a1_relu" and "quant_a1" not in {o.output for o in twin.ops}
    # Add with two users: the ADD keeps its own range and the ReLU is its own RELU op
    assert any(op.kind == "relu" and op.inputs == ("quant_a2",) for op in twin.ops)
    sig, tanh = twin.tensors["quant_sig"], twin.tensors["quant_tanh"]
    assert (sig.scale, sig.zero_point) == (np.float32(1 / 256), -128)
    assert (tanh.scale, tanh.zero_point) == (np.float32(1 / 128), 0)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_twin_equals_the_interpreter(exported, runtime):
    qat, path, folder, x = exported
    twin = lowering.lower(qat)
    m = TFLiteModel(path, runtime)
    codes = np.concatenate([m.quantize_input(x[:8]), all_codes()])
    np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes))
    compare_ops(twin, path, runtime, codes, folder)


# --- other input scales: ties, clamps, and where the runtimes differ --------------------------------------

def _relu6_tie_scale(twin):
    """An input scale at which the standalone RELU6 rescales by exactly 1/2: every odd code is a tie."""
    return np.float32(twin.tensors["quant_r6"].scale * np.float32(0.5))


TANH_TIE = 0.2264491766691208  # tanhf(TANH_TIE) == 57/256 exactly: code zp+1 is a tie (x 128 = 28.5)
SIGMOID_DIFFER = (0.08690798282623291, 108)  # LUTPopulate's and XNNPACK's sigmoid tables differ here
ADD3_DIFFER = (0.05735296383500099, 6)  # the reference and XNNPACK ADD of relu6(x + 3) differ here (3 codes)


_CASE_NAMES = ("relu6 ties", "tanh tie", "sigmoid tables differ", "hard sigmoid ADDs differ",
               "hard sigmoid: every ADD/MUL code", "small scale", "large scale")


def _cases(twin):
    return {"relu6 ties": (_relu6_tie_scale(twin), 3), "tanh tie": (TANH_TIE, 0),
            "sigmoid tables differ": SIGMOID_DIFFER, "hard sigmoid ADDs differ": ADD3_DIFFER,
            "hard sigmoid: every ADD/MUL code": (6.0 / 255.0, -1), "small scale": (0.0037, -77),
            "large scale": (0.9, 40)}  # keys: _CASE_NAMES


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_twin_equals_the_interpreter_at_other_input_scales(exported, runtime):
    qat, path, folder, _ = exported
    twin0 = lowering.lower(qat)
    codes = all_codes()
    mul_inputs = set()
    for case, (scale, zero_point) in _cases(twin0).items():
        file = rewritten(path, folder / f"in_{case.split()[0]}.tflite", input_quantization=(scale, zero_point))
        twin = with_input(twin0, scale, zero_point)
        seen = compare_ops(twin, file, runtime, codes, folder)
        mul_inputs |= set(np.unique(seen["quant_hsig/relu6"][0]).tolist())
        m = TFLiteModel(file, runtime)
        np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes), err_msg=case)
    assert mul_inputs == set(range(-128, 128))  # the hard sigmoid's MUL (fixed scales) seen on its whole domain


def test_the_cases_hit_ties_and_clamps(exported):
    qat, _, _, _ = exported
    twin = lowering.lower(qat)
    assert tuple(_cases(twin)) == _CASE_NAMES
    codes = np.arange(-128, 128)
    r6 = twin.tensors["quant_r6"]
    scale = _relu6_tie_scale(twin)
    assert np.float32(scale / r6.scale) == np.float32(0.5)  # (q - zi) / 2: odd differences are ties
    out = act.relu6([codes], [(scale, 3)], (r6.scale, r6.zero_point))
    assert out.min() == r6.zero_point and (out == r6.zero_point).sum() > 100  # the clamp at 0
    assert np.float32(act._tflite_tanh(np.float32(TANH_TIE))) * 128 == np.float32(28.5)
    hs = act.hard_swish([codes], [(np.float32(0.9), 40)], (twin.tensors["quant_hswish"].scale,
                                                           twin.tensors["quant_hswish"].zero_point))
    assert hs.max() == 127  # saturates at the large input scale


@pytest.mark.parametrize("tensor, cases", [("quant_tanh", ["tanh tie"]), ("quant_sig", ["sigmoid tables differ"]),
                                           ("quant_hsig/relu6", ["hard sigmoid ADDs differ"]),
                                           ("quant_swish_relu", ["trained"] + list(_CASE_NAMES))])
def test_twin_tells_the_runtimes_apart(exported, tensor, cases):
    """Where the arithmetic differs, each runtime's arithmetic fails on the other runtime somewhere.
    LOGISTIC/TANH tables: LUTPopulate (float32 sigmoid with expf, roundf: ties away from zero) vs XNNPACK's
    (double exp, nearbyint: ties to even); the hard sigmoid's ADD: the reference ADD's 20-bit rescaling vs
    XNNPACK's integer multipliers; swish's MUL: a fixed-point multiplier vs a float32 scale."""
    qat, path, folder, _ = exported
    trained = lowering.lower(qat)
    kind = next(op.kind for op in trained.ops if op.output == tensor)
    codes, ref_fails_on_xnnpack, xnnpack_fails_on_ref = all_codes(), False, False
    for case in cases:
        twin, file = trained, path
        if case != "trained":
            scale, zero_point = _cases(trained)[case]
            twin = with_input(trained, scale, zero_point)
            file = rewritten(path, folder / "apart.tflite", input_quantization=(scale, zero_point))
        twin_ref, file_ref = compare_ops(twin, file, "reference", codes, folder, kinds=(kind,))[tensor]
        twin_xnn, file_xnn = compare_ops(twin, file, "xnnpack", codes, folder, kinds=(kind,))[tensor]
        ref_fails_on_xnnpack |= bool(np.any(twin_ref != file_xnn))
        xnnpack_fails_on_ref |= bool(np.any(twin_xnn != file_ref))
    assert ref_fails_on_xnnpack and xnnpack_fails_on_ref


def test_relu_and_hard_swish_share_one_arithmetic():
    """RELU, RELU6, HARD_SWISH are not delegated (XNNPACK takes them in float only): both runtimes run the
    same builtin code on x86, so one kernel serves both. The others are delegated."""
    for kind in ("relu", "relu6", "hard_swish"):
        assert act.KERNELS[kind]["reference"] is act.KERNELS[kind]["xnnpack"]
    for kind in ("logistic", "tanh", "add_const", "mul_const", "swish_mul"):
        assert act.KERNELS[kind]["reference"] is not act.KERNELS[kind]["xnnpack"]


def test_the_hard_sigmoid_mul_maps_every_code_to_itself():
    """Its scales are fixed (6/255 in, (1/6)/255 for the constant 1/6, 1/255 out): both arithmetics give
    the identity on all 256 codes, so the runtimes cannot differ there (the interpreters agree: the
    scale sweep above feeds it every code)."""
    codes = np.arange(-128, 128)
    const = lowering._const_operand(1.0 / 6.0)
    assert (const["const"], const["const_zero_point"]) == (127, -128)
    for runtime in RUNTIMES:
        out = act.KERNELS["mul_const"][runtime]([codes], [(np.float32(6 / 255), -128)], (np.float32(1 / 255), -128),
                                                **const)
        np.testing.assert_array_equal(out, codes)


def test_hard_swish_refuses_a_scale_the_interpreter_refuses():
    with pytest.raises(ValueError, match="HARD_SWISH"):
        act.hard_swish([np.zeros(4, np.int8)], [(np.float32(2.0), 0)], (np.float32(0.01), 0))


def test_qat_model_with_the_hard_layers_reloads(exported, tmp_path):
    qat, _, _, x = exported
    qat.save(tmp_path / "act.h5")
    again = load_qat_model(tmp_path / "act.h5")
    codes = all_codes()
    for runtime in RUNTIMES:
        np.testing.assert_array_equal(lowering.lower(again).run(codes, runtime),
                                      lowering.lower(qat).run(codes, runtime))


# --- transforms.hard_activations ------------------------------------------------------------------------

def mobilenet_v3_style_net():
    """tf_keras MobileNetV3's own hard_swish / hard_sigmoid (TFOpLambda + ReLU(6) + TFOpLambda
    [+ Multiply]), a squeeze-excite gate, and a tf.math.cos that is not the pattern."""
    from tf_keras.src.applications.mobilenet_v3 import hard_sigmoid, hard_swish
    inp = keras.Input((6, 6, 3))
    x = hard_swish(L.Conv2D(4, 3, padding="same", name="conv")(inp))
    gate = hard_sigmoid(L.Conv2D(4, 1, name="se_conv")(L.GlobalAveragePooling2D(keepdims=True)(x)))
    x = L.Multiply(name="se_mul")([x, gate])
    return keras.Model(inp, L.ReLU(6.0, name="other")(tf.math.cos(x)))


def test_hard_activations_become_one_layer_each_with_the_same_function():
    keras.utils.set_random_seed(2)
    model = mobilenet_v3_style_net()
    rewritten_model = transforms.hard_activations(model)
    kinds = [type(layer).__name__ for layer in rewritten_model.layers]
    assert kinds.count("HardSwish") == 1 and kinds.count("HardSigmoid") == 1
    assert kinds.count("TFOpLambda") == 1  # tf.math.cos is left to the audit
    assert "se_mul" in [layer.name for layer in rewritten_model.layers]  # the SE Multiply stays
    x = np.random.default_rng(2).normal(0, 3, (8, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(rewritten_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert transforms.hard_activations(rewritten_model) is rewritten_model  # nothing left to rewrite
    assert [p.cls for p in audit(rewritten_model)] == ["TFOpLambda"]


def test_mobilenet_v3_small_has_no_tf_op_lambda_left():
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10,
                                                include_preprocessing=False)
    assert any(type(layer).__name__ == "TFOpLambda" for layer in model.layers)
    rewritten_model = transforms.hard_activations(model)
    assert not any(type(layer).__name__ == "TFOpLambda" for layer in rewritten_model.layers)
    assert audit(rewritten_model) == []
