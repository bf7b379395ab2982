"""GELU (mobileqat.ops.activations.gelu) against the LiteRT interpreter, bit for bit, on both runtimes.

Keras' ``Activation("gelu")`` (ConvNeXt's; ``approximate=False``) and a Conv2D with ``activation="gelu"``
(split into its own layer) are written by the converter as one int8 GELU each. The int8 GELU is a 256-entry
table filled in float32 (GeluPrepare); XNNPACK (ai-edge-litert 2.3) leaves int8 GELU to that builtin kernel.
One small QAT model is converted once; its input tensor's scale and zero point (and the GELU's
``approximate`` option) are rewritten in copies of the file, so that every one of the 256 input codes is
checked at several scales, for the exact and the tanh-approximate table.
"""
import numpy as np
import pytest

from mobileqat import export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.ops import activations as act
from mobileqat.quantize import load_qat_model
from mobileqat.runtime import TFLiteModel, xnnpack_coverage
from test_ops_activations import _flatbuffer, all_codes, compare_ops, fit_and_export, rewritten, with_input

L = keras.layers
RUNTIMES = ("reference", "xnnpack")
# (input scale, zero point): the trained one is added; small and large scales reach the tails and clamps
SCALES = [(0.0037, -77), (0.02, 0), (0.05, 60), (0.1, -128), (0.9, 40)]


def gelu_net():
    inp = keras.Input((8, 8, 3))
    g = L.Activation("gelu", name="gelu_in")(inp)  # reads the input: every code reaches it
    c = L.Conv2D(3, 1, activation="gelu", name="conv")(inp)  # split: Conv2D, then Activation("gelu")
    return keras.Model(inp, L.Add(name="add")([g, c]), name="gelu_net")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return fit_and_export(gelu_net(), tmp_path_factory.mktemp("gelu"), "gelu")


def with_approximate(path, dest, approximate):
    """A copy of the .tflite whose GELU ops have GeluOptions.approximate = ``approximate``."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    model = _flatbuffer(path)
    codes = [op.builtinCode for op in model.operatorCodes]
    for op in model.subgraphs[0].operators:
        if codes[op.opcodeIndex] == schema.BuiltinOperator.GELU:
            op.builtinOptions.approximate = bool(approximate)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    export.write_atomic(dest, bytes(builder.Output()))
    return str(dest)


def approximate_twin(twin, approximate):
    ops = [lowering.IntOp(op.kind, op.inputs, op.output, dict(op.params, approximate=approximate))
           if op.kind == "gelu" else op for op in twin.ops]
    return lowering.IntegerModel(twin.tensors, ops, twin.input.name, twin.output.name)


def test_the_file_has_two_int8_gelus_the_twin_reproduces(exported):
    qat, path, _, _ = exported
    twin = lowering.lower(qat)
    assert [op.kind for op in twin.ops].count("gelu") == 2
    assert all(op.params["approximate"] is False for op in twin.ops if op.kind == "gelu")
    model = _flatbuffer(path)
    from ai_edge_litert import schema_py_generated as schema
    codes = [op.builtinCode for op in model.operatorCodes]
    gelus = [op for op in model.subgraphs[0].operators if codes[op.opcodeIndex] == schema.BuiltinOperator.GELU]
    assert len(gelus) == 2 and not any(op.builtinOptions.approximate for op in gelus)
    assert provenance.first_difference(twin, path) is None
    assert xnnpack_coverage(path)["left"] == {"GELU": 2}  # not delegated: the builtin table on both runtimes


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_twin_equals_the_interpreter(exported, runtime):
    qat, path, folder, x = exported
    twin = lowering.lower(qat)
    m = TFLiteModel(path, runtime)
    codes = np.concatenate([m.quantize_input(x[:8]), all_codes()])
    np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes))
    compare_ops(twin, path, runtime, codes, folder, kinds=("gelu", "add", "conv2d"))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("approximate", [False, True])
def test_every_code_at_other_scales(exported, runtime, approximate):
    """All 256 codes through the GELU on the input, at each scale of SCALES, exact and approximate."""
    qat, path, folder, _ = exported
    twin0 = approximate_twin(lowering.lower(qat), approximate)
    base = with_approximate(path, folder / f"approx_{approximate}.tflite", approximate)
    codes = all_codes()
    for scale, zero_point in SCALES:
        file = rewritten(base, folder / f"in_{approximate}_{scale}.tflite", input_quantization=(scale, zero_point))
        twin = with_input(twin0, scale, zero_point)
        seen = compare_ops(twin, file, runtime, codes, folder, kinds=("gelu",))
        inputs = codes.ravel()
        got = seen["quant_gelu_in"][0].ravel()
        assert len(np.unique(inputs)) == 256 and got.shape == inputs.shape


def _erff_form(v):
    """0.5f * x * (1.f + erff(x * (float)M_SQRT1_2)) in float32: a plausible formula the file does not use."""
    v = np.asarray(v, np.float32)
    erf = act._c_call("erff", (v * np.float32(0.70710678118654752440)).astype(np.float32), np.float32)
    return ((np.float32(0.5) * v).astype(np.float32) * (np.float32(1.0) + erf).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_check_tells_the_formulas_apart(exported, runtime):
    """The exhaustive check has the power to reject a near-miss: at an input scale (searched) where the
    erff form of GELU rounds one code differently from gelu.h's erfc form, the interpreter agrees with
    the erfc form (the twin) and not with the erff form; and exact and approximate tables differ."""
    qat, path, folder, _ = exported
    twin0 = lowering.lower(qat)
    out = twin0.tensors["quant_gelu_in"]
    rng = np.random.default_rng(0)
    for _ in range(20000):
        scale, zero_point = float(np.float32(rng.uniform(0.005, 0.2))), int(rng.integers(-128, 128))
        exact = act.gelu_table(scale, zero_point, out.scale, out.zero_point)
        if np.any(exact != act.lut_tflite(_erff_form, scale, zero_point, out.scale, out.zero_point)):
            break
    else:
        pytest.fail("no input scale where the erff and erfc forms differ")
    file = rewritten(path, folder / "formulas.tflite", input_quantization=(scale, zero_point))
    twin = with_input(twin0, scale, zero_point)
    codes = all_codes()
    mine, got = compare_ops(twin, file, runtime, codes, folder, kinds=("gelu",))["quant_gelu_in"]
    wrong = act.lut_tflite(_erff_form, scale, zero_point, out.scale, out.zero_point)[codes.astype(int) + 128]
    assert np.any(wrong != got)
    assert any(np.any(act.gelu_table(s, z, out.scale, out.zero_point, approximate=True)
                      != act.gelu_table(s, z, out.scale, out.zero_point))
               for s, z in zip(np.linspace(0.005, 0.2, 200, dtype=np.float32), range(-100, 100)))


def test_gelu_matches_keras_within_one_step(exported):
    """The table is GELU itself: each code's value is Keras' gelu of the input value, rounded to the output grid."""
    qat, _, _, _ = exported
    out = lowering.lower(qat).tensors["quant_gelu_in"]
    codes = np.arange(-128, 128)
    for scale, zero_point in SCALES:
        v = (codes - zero_point) * np.float32(scale)
        want = np.clip(np.round(keras.activations.gelu(v.astype(np.float32)).numpy() / out.scale) + out.zero_point,
                       -128, 127)
        got = act.gelu([codes], [(np.float32(scale), zero_point)], (out.scale, out.zero_point))
        assert np.abs(got.astype(int) - want).max() <= 1


def test_qat_model_with_gelu_reloads(exported, tmp_path):
    qat, _, _, x = exported
    qat.save(tmp_path / "gelu.h5")
    again = load_qat_model(tmp_path / "gelu.h5")
    np.testing.assert_array_equal(again(x[:4], training=False), qat(x[:4], training=False))
