"""Resize and transposed-convolution ops (mobileqat.ops.resize) against the LiteRT interpreter, bit for bit.

One small QAT model, fitted briefly and exported once, holds every case: UpSampling2D nearest/bilinear by 2
and 3 on an odd 5x7 input, Resizing nearest/bilinear down to 9x13 (non-integer ratios), Conv2DTranspose
stride 2 with kernels 2/3/4, SAME and VALID, with and without bias, fused ReLU/ReLU6; branches joined by ADD.
Test inputs reach 1.5x the trained range, so the int8 input, the transposed convolutions and the ReLUs clamp.
"""
import re

import numpy as np
import pytest

from mobileqat import export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.ops import resize
from mobileqat.quantize import audit, quantize
from mobileqat.runtime import TFLiteModel
from tests.test_integer_xnnpack import read_graph

L = keras.layers
_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK", "DELEGATE")
_NARROWED = ("quant_tconv2_valid", "quant_tconv4_valid", "quant_tconv3_valid_nobias")


def resize_net():
    inp = keras.Input((5, 7, 3))
    stem = L.BatchNormalization(name="stem_bn")(L.Conv2D(4, 1, use_bias=False, name="stem")(inp))
    a = L.UpSampling2D(2, interpolation="nearest", name="up_nearest2")(stem)                      # 10x14
    a = L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu", name="tconv3_same_relu")(a)  # 20x28
    a = L.Resizing(9, 13, interpolation="bilinear", name="resize_bilinear")(a)
    b = L.UpSampling2D(2, interpolation="bilinear", name="up_bilinear2")(stem)                    # 10x14
    b = L.Conv2DTranspose(4, 2, strides=2, padding="valid", name="tconv2_valid")(b)               # 20x28
    b = L.Resizing(9, 13, interpolation="nearest", name="resize_nearest")(b)
    c = L.UpSampling2D(3, interpolation="bilinear", name="up_bilinear3")(stem)                    # 15x21
    c = L.Conv2DTranspose(4, 4, strides=2, padding="same", activation="relu6", name="tconv4_same_relu6")(c)  # 30x42
    c = L.Resizing(9, 13, interpolation="bilinear", name="resize_bilinear_down")(c)
    d = L.UpSampling2D(3, interpolation="nearest", name="up_nearest3")(stem)                      # 15x21
    d = L.Conv2DTranspose(4, 3, strides=2, padding="valid", use_bias=False, name="tconv3_valid_nobias")(d)  # 31x43
    d = L.Resizing(9, 13, interpolation="nearest", name="resize_nearest_down")(d)
    e = L.Conv2DTranspose(4, 4, strides=2, padding="valid", name="tconv4_valid")(stem)            # 12x16
    e = L.Conv2DTranspose(4, 2, strides=2, padding="same", name="tconv2_same")(e)                 # 24x32
    e = L.Resizing(9, 13, interpolation="bilinear", name="resize_bilinear_down2")(e)
    x = L.Add(name="add_ab")([a, b])
    x = L.Add(name="add_c")([x, c])
    x = L.Add(name="add_d")([x, d])
    return keras.Model(inp, L.Add(name="add_e")([x, e]), name="resize_net")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (48, 5, 7, 3)).astype(np.float32)
    qat = quantize(resize_net())
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    qat.fit(x, np.asarray(qat(x)) * 1.1 + 0.1, epochs=1, batch_size=16, verbose=0)
    for name in _NARROWED:  # output ranges narrower than the data: these requantizations saturate
        v = qat.get_layer(name)._output_quantizer_vars
        for var in (v["min_var"], v["max_var"]):
            var.assign(var * 0.4)
    path = str(tmp_path_factory.mktemp("resize") / "resize_net.tflite")
    export.export_tflite(qat, path)
    test_x = np.concatenate([rng.uniform(-1.5, 1.5, (16, 5, 7, 3)),  # beyond the input range: clamps
                             1.5 * rng.choice([-1.0, 1.0], (8, 5, 7, 3))]).astype(np.float32)
    return qat, lowering.lower(qat), path, test_x


def _file_tensors(path, runtime, codes):
    """{twin layer name: the file's int8 tensor} after one invoke on ``runtime``, and the final output."""
    m = TFLiteModel(path, runtime, preserve_all_tensors=True)  # XNNPACK then keeps every op's output
    out = m.invoke_raw(codes)
    return _by_layer(m.interpreter), out


def _by_layer(it):
    """{Keras layer name: output tensor of the file op whose output tensor the converter named after it}."""
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    by_layer = {}
    for op in it._get_ops_details():
        if op["op_name"] not in _SHAPE_OPS:
            for part in re.split("[;/]", names[op["outputs"][0]]):
                by_layer.setdefault(part, it.get_tensor(op["outputs"][0]))
    return by_layer


def test_converter_writes_what_the_twin_reads(exported):
    qat, integer_model, path, _ = exported
    m = TFLiteModel(path, "reference")
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    graph, _, _ = read_graph(path)
    names = [op["name"] for op in graph]
    assert names.count("RESIZE_NEAREST_NEIGHBOR") == 4 and names.count("RESIZE_BILINEAR") == 5
    assert names.count("TRANSPOSE_CONV") == 6
    for op in graph:
        t_out = tensors[op["outputs"][0]]
        if op["name"].startswith("RESIZE"):  # same quantization in and out, TF2 half-pixel sampling
            assert tensors[op["inputs"][0]]["quantization"] == t_out["quantization"]
            assert (op["options"].alignCorners, op["options"].halfPixelCenters) == (False, True)
        if op["name"] == "TRANSPOSE_CONV":
            w = tensors[op["inputs"][1]]
            assert len(w["quantization_parameters"]["scales"]) == 1  # per-tensor
            layer = t_out["name"].split("/")[1]
            fused = {"quant_tconv3_same_relu": 1, "quant_tconv4_same_relu6": 3}.get(layer, 0)
            assert op["options"].fusedActivationFunction == fused
            assert (len(op["inputs"]) == 4) == (layer != "quant_tconv3_valid_nobias")
    # UpSampling2D / Resizing keep their input's scale: no output quantizer in the QAT model
    assert not qat.get_layer("quant_up_bilinear3")._output_quantizers
    assert provenance.first_difference(integer_model, path) is None


def test_provenance_compares_transpose_conv_weights_and_bias(exported):
    _, integer_model, path, _ = exported
    op = next(o for o in integer_model.ops if o.output == "quant_tconv2_valid")
    saved = op.params["bias"]
    try:
        op.params["bias"] = saved + 1
        assert "bias of layer 'quant_tconv2_valid'" in provenance.first_difference(integer_model, path)
    finally:
        op.params["bias"] = saved
    nobias = next(o for o in integer_model.ops if o.output == "quant_tconv3_valid_nobias")
    try:
        nobias.params["bias"] = np.zeros(4, np.int32)  # a bias of zeros is what no bias computes
        assert provenance.first_difference(integer_model, path) is None
        nobias.params["bias"] = np.ones(4, np.int32)
        assert "has a bias where the other has none" in provenance.first_difference(integer_model, path)
    finally:
        nobias.params["bias"] = None


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_twin_equals_interpreter_tensor_by_tensor(exported, runtime):
    _, integer_model, path, x = exported
    codes = TFLiteModel(path, runtime).quantize_input(x)
    in_file, _ = _file_tensors(path, runtime, codes)
    ours = integer_model.run(codes, runtime, keep_all=True)
    checked = 0
    for op in integer_model.ops:
        expected = in_file[op.output]
        assert ours[op.output].shape == expected.shape, op.output
        np.testing.assert_array_equal(ours[op.output], expected, err_msg=f"{runtime} {op.output}")
        checked += op.kind in resize.KERNELS
    assert checked == 15
    # the final output on the runtime as deployed (no preserved tensors, XNNPACK's two partitions)
    m = TFLiteModel(path, runtime)
    np.testing.assert_array_equal(integer_model.run(codes, runtime), m.invoke_raw(codes))


def test_inputs_reach_ties_negatives_and_clamps(exported):
    _, integer_model, path, x = exported
    codes = TFLiteModel(path, "reference").quantize_input(x)
    values = integer_model.run(codes, "reference", keep_all=True)
    stem = values["quant_stem"]
    assert (stem < 0).mean() > 0.2
    assert (np.abs(codes) >= 127).any()  # the input quantizer clamps
    for name in _NARROWED:
        assert (values[name] == 127).any() and (values[name] == -128).any(), name  # saturates both ways
    t = integer_model.tensors["quant_tconv3_same_relu"]
    assert (values["quant_tconv3_same_relu"] == t.zero_point).mean() > 0.1  # ReLU clamps at zero
    # bilinear x2 weights are exact quarters: the runtimes differ only at ties below zero
    up = resize.resize_bilinear_reference([stem], [(1.0, 0)], (1.0, 0), size=(10, 14)).astype(int)
    q20 = _q20_x2(stem)
    tie_below_zero = (q20 < 0) & (q20 % (1 << 20) == 1 << 19)
    assert tie_below_zero.sum() > 10
    xnn = resize.resize_bilinear_xnnpack([stem], [(1.0, 0)], (1.0, 0), size=(10, 14)).astype(int)
    np.testing.assert_array_equal(up != xnn, tie_below_zero)
    np.testing.assert_array_equal(up[tie_below_zero], xnn[tie_below_zero] - 1)


def _q20_x2(x):
    """The reference's Q20 sums for a x2 half-pixel upsampling, by hand (weights 1/4, 3/4)."""
    x = np.asarray(x, np.int64)

    def axis_weights(n):
        o = np.arange(2 * n)
        lo = np.clip((o - 1) // 2, 0, n - 1)
        hi = np.clip((o + 1) // 2, 0, n - 1)
        w_hi = np.where(o % 2 == 1, 256, 768)
        w_hi = np.where(o == 0, -256, w_hi)  # the border position -0.25: weight outside [0, 1], same pixel
        return lo, hi, w_hi
    y0, y1, wy = axis_weights(x.shape[1])
    x0, x1, wx = axis_weights(x.shape[2])
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]

    def at(iy, ix):
        return x[:, iy][:, :, ix]
    return (at(y0, x0) * (1024 - wy) * (1024 - wx) + at(y1, x0) * wy * (1024 - wx)
            + at(y0, x1) * (1024 - wy) * wx + at(y1, x1) * wy * wx)


def test_reference_bilinear_arithmetic_fails_on_xnnpack(exported):
    """The twin tells the runtimes apart: the reference arithmetic, applied to XNNPACK's own inputs of
    each RESIZE_BILINEAR, misses XNNPACK's outputs; and whole-model runs differ."""
    _, integer_model, path, x = exported
    m = TFLiteModel(path, "xnnpack")
    codes = m.quantize_input(x)
    in_file, out = _file_tensors(path, "xnnpack", codes)
    src = {op.output: op.inputs[0] for op in integer_model.ops}
    for op in (o for o in integer_model.ops if o.kind == "resize_bilinear"):
        t = integer_model.tensors[op.output]
        q = [(t.scale, t.zero_point)]
        xnn_in, xnn_out = in_file[src[op.output]], in_file[op.output]
        np.testing.assert_array_equal(resize.resize_bilinear_xnnpack([xnn_in], q, q[0], **op.params), xnn_out)
        wrong = resize.resize_bilinear_reference([xnn_in], q, q[0], **op.params)
        assert (wrong != xnn_out).any(), op.output
    assert (integer_model.run(codes, "reference") != out).any()
    ref_out = TFLiteModel(path, "reference").invoke_raw(codes)
    assert (integer_model.run(codes, "xnnpack") != ref_out).any()


def test_static_output_shape_lets_xnnpack_take_transpose_conv(exported, tmp_path):
    """With a constant output shape (no SHAPE/STRIDED_SLICE/PACK) the delegate takes TRANSPOSE_CONV and
    requantizes in fp32 (transpose_conv_xnnpack); the files mobileqat exports compute the shape, so
    LiteRT's default path runs the builtin kernel there (the fixed-point arithmetic the twin uses)."""
    _, integer_model, path, x = exported
    static = str(tmp_path / "static.tflite")
    _freeze_transpose_conv_shapes(path, static, batch=1)
    m = TFLiteModel(static, "xnnpack", preserve_all_tensors=True)
    fixed = checked = 0
    for i in range(6):
        m.invoke_raw(m.quantize_input(x[i:i + 1]))
        in_file = _by_layer(m.interpreter)
        for op in (o for o in integer_model.ops if o.kind == "transpose_conv"):
            expected = in_file[op.output]
            t_in, t_out = integer_model.tensors[op.inputs[0]], integer_model.tensors[op.output]
            args = ([in_file[op.inputs[0]]], [(t_in.scale, t_in.zero_point)], (t_out.scale, t_out.zero_point))
            np.testing.assert_array_equal(resize.transpose_conv_xnnpack(*args, **op.params), expected)
            fixed += int((resize.transpose_conv(*args, **op.params) != expected).sum())
            checked += 1
    assert checked == 36 and fixed > 0


def _freeze_transpose_conv_shapes(src, dst, batch):
    """Rewrite ``src``: every TRANSPOSE_CONV gets a constant output shape, the int32 shape ops go."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    with open(src, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    sg, ops = model.subgraphs[0], schema.BuiltinOperator
    code = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    kept = []
    for op in sg.operators:
        if code[op.opcodeIndex] in (ops.SHAPE, ops.STRIDED_SLICE, ops.PACK):
            continue
        if code[op.opcodeIndex] == ops.TRANSPOSE_CONV:
            buffer = schema.BufferT()
            shape = np.array([batch] + list(sg.tensors[op.outputs[0]].shape[1:]), np.int32)
            buffer.data = np.frombuffer(shape.tobytes(), np.uint8)
            model.buffers.append(buffer)
            sg.tensors[op.inputs[0]].buffer = len(model.buffers) - 1
        kept.append(op)
    sg.operators = kept
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    export.write_atomic(dst, bytes(builder.Output()))


def test_nearest_index_follows_the_reference_rounding():
    # 5 -> 15 (x3) and 20 -> 9 (down): floor((o + 0.5) * in / out) in float32
    np.testing.assert_array_equal(resize._nearest_index(15, 5, False, True), np.repeat(np.arange(5), 3))
    np.testing.assert_array_equal(resize._nearest_index(9, 20, False, True),
                                  np.floor((np.arange(9) + 0.5) * np.float32(20 / 9)).astype(int))


def _model(layer, shape=(6, 6, 3)):
    inp = keras.Input(shape)
    return keras.Model(inp, layer(inp))


@pytest.mark.parametrize("layer, words", [
    (lambda: L.Conv2DTranspose(2, 3, strides=2, use_bias=False, activation="relu", name="t"), "use_bias=True"),
    (lambda: L.Conv2DTranspose(2, 3, dilation_rate=2, name="t"), "dilation_rate=1"),
    (lambda: L.Conv2DTranspose(2, 3, strides=2, output_padding=1, name="t"), "output_padding=None"),
    (lambda: L.UpSampling2D(2, interpolation="bicubic", name="t"), "'nearest' or 'bilinear'"),
    (lambda: L.Resizing(4, 4, interpolation="area", name="t"), "'nearest' or 'bilinear'"),
    (lambda: L.Resizing(4, 5, crop_to_aspect_ratio=True, name="t"), "crop_to_aspect_ratio=False"),
])
def test_audit_refuses_what_does_not_lower(layer, words):
    problems = audit(_model(layer()))
    assert len(problems) == 1 and problems[0].name == "t" and words in problems[0].fix, problems


def test_batchnorm_after_conv2d_transpose_becomes_a_per_channel_affine():
    """Not folded into the TRANSPOSE_CONV: quantize.REWRITES makes it a 1x1 depthwise scale and offset."""
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Conv2DTranspose(2, 3, strides=2, name="t")(inp)))
    assert audit(model) == []
    kinds = [type(getattr(la, "layer", la)).__name__ for la in quantize(model).layers]
    assert "Conv2DTranspose" in kinds and "FoldedConvBN" in kinds and "BatchNormalization" not in kinds