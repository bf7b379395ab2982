"""TFLite int16x8 (scheme "w8a16"): 16-bit symmetric activations, 8-bit weights, end to end.

A small QAT model (conv+BN+ReLU6 stride 2, depthwise+BN+ReLU6, 1x1 projection+BN, residual Add, GAP, Dense,
softmax) quantized with "w8a16", fine-tuned a few steps and exported. Checked against the interpreter, never
against mobileqat itself: what the converter writes (int16 tensors with zero point 0, int8 weights, int64
biases after ``export`` widens them, softmax 1/32768); each ``mobileqat.ops.int16x8`` kernel fed the
interpreter's own input tensors gives the interpreter's output tensor, op by op, on the reference kernels
and on the default (XNNPACK) path, which delegates none of these ops; ``mobileqat.lower`` reproduces the
file at 0 LSB on both runtimes; the scheme, quantizer and export refuse what they cannot do."""
import numpy as np
import pytest

from mobileqat import export, harness, lowering, tflite_file
from mobileqat._tf import keras
from mobileqat.ops import int16x8
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.quantizers import SymmetricActivationQuantizer
from mobileqat.runtime import TFLiteModel
from mobileqat.schemes import PRESETS, QuantScheme

L = keras.layers
RUNTIMES = {"reference": "reference", "xnnpack": "xnnpack"}  # twin runtime -> interpreter runtime


def net():
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Softmax(name="probs")(x), name="int16_net")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int16")
    keras.utils.set_random_seed(16)
    rng = np.random.default_rng(16)
    x = rng.uniform(-1, 1, (128, 12, 12, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].std(axis=(1, 2)) > 0.577)
    qat = quantize(net(), "w8a16")
    qat.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = str(folder / "int16.tflite")
    export.export_tflite(qat, path)
    # wider than the training data: the activations reach the ends of their ranges (clamps, saturation)
    probe = rng.uniform(-1.6, 1.6, (192, 12, 12, 3)).astype(np.float32)
    return qat, path, x, y, probe, folder


def _graph(path):
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    root = flatbuffer_utils.read_model_from_bytearray(bytearray(open(path, "rb").read()))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sub = root.subgraphs[0]
    ops = []
    for op in sub.operators:
        code = root.operatorCodes[op.opcodeIndex]
        ops.append((names[max(code.builtinCode, code.deprecatedBuiltinCode)], list(op.inputs), list(op.outputs),
                    op.builtinOptions))
    return root, sub, ops, types


def test_the_converter_writes_int16x8(exported):
    _, path, _, _, _, _ = exported
    root, sub, ops, types = _graph(path)
    assert [o[0] for o in ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED",
                                   "SOFTMAX"]
    for name, ins, outs, _ in ops:
        for i in [ins[0]] + outs:
            t = sub.tensors[i]
            assert types[t.type] == "INT16" and list(t.quantization.zeroPoint) == [0], (name, t.name)
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            assert types[sub.tensors[ins[1]].type] == "INT8", name
            if len(ins) > 2 and ins[2] >= 0:
                assert types[sub.tensors[ins[2]].type] == "INT64", name  # widened by export
    softmax_out = sub.tensors[ops[-1][2][0]].quantization
    assert softmax_out.scale[0] == np.float32(1 / 32768) and softmax_out.zeroPoint[0] == 0
    types_ = export.tensor_types(path)
    assert types_ == {"input": "int16", "output": "int16", "float_ops": []}


def test_export_widens_the_converters_int32_biases_exactly(exported):
    qat, path, _, _, _, _ = exported
    # the converter's own bytes (int32 biases) against the exported file (export widened them)
    from mobileqat._tf import tf
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int16
    original = converter.convert()
    _, sub0, ops0, types = _graph_bytes(original)
    widened, count = tflite_file.int64_biases(original)
    _, sub1, ops1, _ = _graph(path)
    biases = [ins[2] for name, ins, _, _ in ops0
              if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(ins) > 2 and ins[2] >= 0]
    assert count == len(biases) == 4
    root0, root1 = _root(original), _root(open(path, "rb").read())
    for b in biases:
        assert types[sub0.tensors[b].type] == "INT32" and types[sub1.tensors[b].type] == "INT64"
        v0 = np.frombuffer(bytes(root0.buffers[sub0.tensors[b].buffer].data), np.int32)
        v1 = np.frombuffer(bytes(root1.buffers[sub1.tensors[b].buffer].data), np.int64)
        np.testing.assert_array_equal(v0, v1)
        np.testing.assert_array_equal(sub0.tensors[b].quantization.scale, sub1.tensors[b].quantization.scale)
    with pytest.raises(RuntimeError, match="INT64"):  # what the unwidened file does on the interpreter
        from ai_edge_litert.interpreter import Interpreter
        Interpreter(model_content=original).allocate_tensors()


def _root(data):
    from ai_edge_litert.tools import flatbuffer_utils
    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _graph_bytes(data):
    import os
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".tflite", delete=False) as f:
        f.write(data)
    try:
        return _graph(f.name)
    finally:
        os.unlink(f.name)


_ACT = {0: None, 1: "RELU", 3: "RELU6"}


def _op_by_op(path, probe, runtime):
    """[(op name, kernel output, interpreter output)] for every op, the kernel fed the interpreter's inputs."""
    root, sub, ops, _ = _graph(path)
    m = TFLiteModel(path, RUNTIMES[runtime], preserve_all_tensors=True)
    m.invoke_raw(m.quantize_input(probe))
    it = m.interpreter

    def q(i):
        t = sub.tensors[i].quantization
        return np.float32(t.scale[0]), int(t.zeroPoint[0])

    def const(i):
        return it.get_tensor(i) if i >= 0 else None

    out = []
    for name, ins, outs, opt in ops:
        x, o = it.get_tensor(ins[0]), outs[0]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            kind = "conv2d_i16" if name == "CONV_2D" else "depthwise_conv2d_i16"
            params = dict(weights=const(ins[1]), filter_scales=np.asarray(sub.tensors[ins[1]].quantization.scale,
                                                                          np.float32),
                          bias=const(ins[2]), stride=(opt.strideH, opt.strideW),
                          padding="SAME" if opt.padding == 0 else "VALID", activation=_ACT[opt.fusedActivationFunction])
            xs = [x]
        elif name == "FULLY_CONNECTED":
            kind = "fully_connected_i16"
            params = dict(weights=const(ins[1]), filter_scales=np.asarray(sub.tensors[ins[1]].quantization.scale,
                                                                          np.float32),
                          bias=const(ins[2]) if len(ins) > 2 else None, activation=_ACT[opt.fusedActivationFunction])
            xs = [x.reshape(len(x), -1)]
        elif name == "ADD":
            kind, params, xs = "add_i16", dict(activation=_ACT[opt.fusedActivationFunction]), [x, it.get_tensor(ins[1])]
        elif name == "MEAN":
            kind, params, xs = "mean_hw_i16", dict(keepdims=bool(opt.keepDims)), [x]
        elif name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            assert opt.fusedActivationFunction == 0
            kind = "max_pool2d_i16" if name == "MAX_POOL_2D" else "average_pool2d_i16"
            params = dict(pool=(opt.filterHeight, opt.filterWidth), stride=(opt.strideH, opt.strideW),
                          padding="SAME" if opt.padding == 0 else "VALID")
            xs = [x]
        elif name == "SOFTMAX":
            assert opt.beta == 1.0
            kind, params, xs = "softmax_i16", {}, [x]
        else:
            raise AssertionError(f"no int16 kernel for {name}")
        ins_q = [q(i) for i in ins[:len(xs)]]
        got = int16x8.KERNELS[kind][runtime](xs, ins_q, q(o), **params)
        expected = it.get_tensor(o)
        out.append((name, got.reshape(expected.shape), expected))
    return out


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_each_kernel_equals_the_interpreter_op_by_op(exported, runtime):
    _, path, _, _, probe, _ = exported
    for name, got, expected in _op_by_op(path, probe, runtime):
        assert got.dtype == expected.dtype == np.int16, name
        np.testing.assert_array_equal(got, expected, err_msg=f"{runtime} {name}")
        assert len(np.unique(expected)) > 20, name  # not a degenerate (saturated or constant) tensor


def no_bias_net():
    """A plain Conv2D with bias and ReLU, max and average pooling, GAP, a Dense without bias (the file's
    FULLY_CONNECTED has no bias tensor), softmax."""
    inp = keras.Input((11, 11, 3))
    x = L.Conv2D(12, 3, activation="relu", name="plain")(inp)
    x = L.MaxPooling2D(2, padding="same")(x)
    x = L.AveragePooling2D(3, strides=1, padding="same")(x)
    x = L.Dense(5, use_bias=False, name="logits")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Softmax()(x), name="int16_no_bias")


@pytest.fixture(scope="module")
def no_bias(tmp_path_factory):
    keras.utils.set_random_seed(17)
    rng = np.random.default_rng(17)
    x = rng.uniform(-1, 1, (64, 11, 11, 3)).astype(np.float32)
    qat = quantize(no_bias_net(), "w8a16")
    for i in range(0, 64, 16):
        qat(x[i:i + 16], training=True)
    path = str(tmp_path_factory.mktemp("int16_no_bias") / "no_bias.tflite")
    export.export_tflite(qat, path)
    return qat, path, rng.uniform(-1.6, 1.6, (512, 11, 11, 3)).astype(np.float32)


def test_fully_connected_without_bias_rounds_differently_on_the_two_paths(no_bias):
    """With an int64 bias both runtimes' int16 FULLY_CONNECTED scale the accumulator in double with
    std::round (previous tests). Without a bias tensor the builtin kernel on the default path runs through
    ruy (fixed-point multiplier, ties toward +inf): the two runtimes then disagree by 1 somewhere, and the
    twin follows each."""
    qat, path, probe = no_bias
    root, sub, ops, _ = _graph(path)
    assert [o[0] for o in ops] == ["CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"]
    assert len(ops[4][1]) == 2 or ops[4][1][2] < 0  # no bias tensor
    outs = {}
    for runtime in ("reference", "xnnpack"):
        for name, got, expected in _op_by_op(path, probe, runtime):
            np.testing.assert_array_equal(got, expected, err_msg=f"{runtime} {name}")
            if name == "FULLY_CONNECTED":
                outs[runtime] = expected.astype(int)
    diff = np.abs(outs["reference"] - outs["xnnpack"])
    assert diff.max() == 1, diff.max()
    twin = lowering.lower(qat)
    for runtime in ("reference", "xnnpack"):
        m = TFLiteModel(path, runtime)
        codes = m.quantize_input(probe)
        np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes), err_msg=runtime)


def test_xnnpack_delegates_no_int16x8_op(exported):
    _, path, _, _, probe, _ = exported
    m = TFLiteModel(path, "xnnpack")
    m.invoke_raw(m.quantize_input(probe[:1]))
    assert "DELEGATE" not in [op["op_name"] for op in m.interpreter._get_ops_details()]


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_integer_twin_matches_the_file_at_0_lsb(exported, runtime):
    qat, path, x, _, probe, _ = exported
    twin = lowering.lower(qat)
    assert twin.dtype == np.int16 and [op.kind for op in twin.ops] == [
        "conv2d_i16", "depthwise_conv2d_i16", "conv2d_i16", "add_i16", "mean_hw_i16", "fully_connected_i16",
        "softmax_i16"]
    m = TFLiteModel(path, runtime)
    data = np.concatenate([x, probe])
    codes = m.quantize_input(data)
    np.testing.assert_array_equal(twin.quantize_input(data), codes)
    out = np.concatenate([m.invoke_raw(codes[i:i + 32]) for i in range(0, len(codes), 32)])
    np.testing.assert_array_equal(twin.run(codes, runtime), out)


def test_harness_reports_the_integer_path_at_0_lsb(exported):
    qat, path, x, y, _, _ = exported
    result = harness.validate(path, x, y, model=qat)
    assert "integer_path_error" not in result, result.get("integer_path_error")
    for runtime in ("reference", "xnnpack"):
        r = result["runtimes"][runtime]
        assert r["simulation"] == "integer" and r["max_lsb_diff"] == 0, (runtime, r)


def test_h5_round_trip_keeps_the_16_bit_quantizers(exported):
    qat, path, x, _, _, folder = exported
    qat.save(folder / "int16.h5")
    loaded = load_qat_model(folder / "int16.h5")
    assert export.activation_bits(loaded) == 16
    np.testing.assert_array_equal(lowering.lower(loaded).run(lowering.lower(qat).quantize_input(x[:8])),
                                  lowering.lower(qat).run(lowering.lower(qat).quantize_input(x[:8])))
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), qat.predict(x[:8], verbose=0), atol=1e-6)


def test_symmetric_quantizer_config_round_trip_and_grid():
    q = SymmetricActivationQuantizer(16, ema_decay=0.9)
    assert SymmetricActivationQuantizer.from_config(q.get_config()) == q
    assert keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q)) == q
    with pytest.raises(ValueError, match="only 16"):
        SymmetricActivationQuantizer(8)
    scale, zp = lowering.quantization_params(-np.float32(2.5), np.float32(2.5), 16, narrow_range=True)
    assert zp == 0 and scale == pytest.approx(2.5 / 32767, rel=1e-12)


def test_scheme_w8a16_and_its_refusals():
    s = PRESETS["w8a16"]
    assert (s.weight_bits, s.activation_bits, s.per_channel) == (8, 16, True)
    assert isinstance(s.activation_quantizer(), SymmetricActivationQuantizer)
    with pytest.raises(ValueError, match="int16x8.*weight_bits=8"):
        QuantScheme("x", weight_bits=4, activation_bits=16)
    with pytest.raises(ValueError, match="activation_bits=12"):
        QuantScheme("x", activation_bits=12)


def test_rules_that_mix_activation_bits_are_refused():
    rules = {"default": "w8a16", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"}]}
    with pytest.raises(ValueError, match="mix activation_bits"):
        quantize(net(), rules)


def test_export_refuses_int8_io_for_a_16_bit_model(exported, tmp_path):
    qat = exported[0]
    with pytest.raises(ValueError, match="io_type='int16'"):
        export.export_tflite(qat, tmp_path / "x.tflite", io_type="int8")
    assert not (tmp_path / "x.tflite").exists()
