"""The QAT model's integer-exact path (mobileqat.lowering) against the converter's file and the
interpreter: same parameters, and the same integers tensor by tensor."""
import numpy as np
import pytest

from mobileqat import debug, export, harness, lowering
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers
KINDS = {"CONV_2D": "conv2d", "DEPTHWISE_CONV_2D": "depthwise_conv2d", "ADD": "add", "MEAN": "mean_hw",
         "FULLY_CONNECTED": "fully_connected", "SOFTMAX": "softmax"}


def residual_net(input_shape=(15, 15, 3), classes=5):
    """Every op the lowering knows: strided conv, depthwise (stride 1 and 2), linear projection,
    an Add of two branches with different ranges, GAP, Dropout, Dense, softmax; odd sizes."""
    inp = keras.Input(input_shape)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(name="dw_bn")(y))
    y = L.BatchNormalization(name="proj_bn")(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="dw2")(x)
    x = L.ReLU(name="dw2_relu")(L.BatchNormalization(name="dw2_bn")(x))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(classes, name="logits")(L.Dropout(0.1, name="drop")(x))
    return keras.Model(inp, L.Activation("softmax", name="probs")(x), name="residual_net")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (96, 15, 15, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 2].std(axis=(1, 2)) > 0.577)
    qat = quantize(residual_net())
    proj = next(layer for layer in qat.layers if layer.name == "quant_proj")
    gamma = next(w for w in proj.trainable_weights if "gamma" in w.name)
    gamma.assign(gamma * 4.0)  # the two Add inputs get clearly different scales
    qat.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=2, batch_size=16, verbose=0)
    folder = tmp_path_factory.mktemp("lowering")
    paths = {io: str(folder / f"qat_{io}.tflite") for io in ("int8", "uint8")}
    for io, path in paths.items():
        export.export_tflite(qat, path, "qat_int8", io_type=io)
    return qat, paths, x, y


def _file_ops(path):
    m = TFLiteModel(path, "reference", preserve_all_tensors=True)
    it = m.interpreter
    return m, it, {t["index"]: t for t in it.get_tensor_details()}, it._get_ops_details()


def test_quantization_params_follow_the_converter():
    # [-1, 1] on the unsigned grid: zero point 127.5 -> 128, i.e. 0 signed (the signed grid gives -1)
    assert lowering.quantization_params(-1.0, 1.0) == pytest.approx((2 / 255, 0))
    assert lowering.quantization_params(-1.0, 1.0)[1] == 0
    assert lowering.quantization_params(0.0, 6.0) == pytest.approx((6 / 255, -128))
    assert lowering.quantization_params(-0.5, 0.5, narrow_range=True) == pytest.approx((1 / 254, 0))
    scale, zp = lowering.quantization_params(-0.3, 2.0)
    assert scale == pytest.approx(2.3 / 255) and abs((-128 - zp) * scale + 0.3) <= scale / 2  # min nudged


def test_lowered_parameters_equal_the_converters_file(exported):
    qat, paths, _, _ = exported
    integer_model = lowering.lower(qat)
    _, it, tensors, ops = _file_ops(paths["int8"])
    lowered = [op for op in integer_model.ops if op.kind not in ("identity", "reshape")]
    assert [KINDS[op["op_name"]] for op in ops] == [op.kind for op in lowered]
    for fop, lop in zip(ops, lowered):
        t_out, q_out = tensors[fop["outputs"][0]], integer_model.tensors[lop.output]
        assert (np.float32(t_out["quantization"][0]), t_out["quantization"][1]) == (q_out.scale, q_out.zero_point)
        if "weights" in lop.params:
            t_w, t_b = tensors[fop["inputs"][1]], tensors[fop["inputs"][2]]
            np.testing.assert_array_equal(it.get_tensor(t_w["index"]), lop.params["weights"])
            np.testing.assert_array_equal(t_w["quantization_parameters"]["scales"],
                                          np.atleast_1d(lop.params["filter_scales"]))
            np.testing.assert_array_equal(it.get_tensor(t_b["index"]), lop.params["bias"])
    add = next(op for op in ops if op["op_name"] == "ADD")
    s1, s2 = (tensors[i]["quantization"][0] for i in add["inputs"])
    assert max(s1, s2) / min(s1, s2) > 2  # the Add really rescales


def test_integer_path_equals_reference_kernels_tensor_by_tensor(exported):
    qat, paths, x, _ = exported
    integer_model = lowering.lower(qat)
    m, it, tensors, ops = _file_ops(paths["int8"])
    codes = m.quantize_input(x)
    out = m.invoke_raw(codes)
    np.testing.assert_array_equal(integer_model.quantize_input(x), codes)
    values = integer_model.run(codes, "reference", keep_all=True)
    lowered = [op for op in integer_model.ops if op.kind not in ("identity", "reshape")]
    for fop, lop in zip(ops, lowered):
        expected = it.get_tensor(fop["outputs"][0])
        np.testing.assert_array_equal(values[lop.output].reshape(expected.shape), expected, err_msg=lop.output)
    np.testing.assert_array_equal(integer_model.run(codes, "reference"), out)


def test_integer_path_equals_xnnpack_output(exported):
    qat, paths, x, _ = exported
    m = TFLiteModel(paths["int8"], "xnnpack")
    out = m.invoke_raw(m.quantize_input(x))
    integer_model = lowering.lower(qat)
    np.testing.assert_array_equal(integer_model.run(m.quantize_input(x), "xnnpack"), out)
    assert np.any(integer_model.run(m.quantize_input(x), "reference") != out)  # a test the reference path fails


def test_validate_compares_the_integer_path_on_uint8_io(exported):
    qat, paths, x, y = exported
    result = harness.validate(paths["uint8"], x, y, model=qat)
    for name in ("reference", "xnnpack"):
        r = result["runtimes"][name]
        assert r["simulation"] == "integer"
        assert (r["top1_agreement"], r["frac_within_1lsb"], r["max_lsb_diff"]) == (1.0, 1.0, 0)
        assert r["accuracy"] == result["integer_accuracy"][name]
        assert set(r["float_sim"]) >= {"top1_agreement", "max_lsb_diff"}


def test_debugger_shows_the_integer_path_at_zero_lsb(exported):
    qat, paths, x, _ = exported
    result = debug.debug_fidelity(qat, paths["int8"], x[:16])
    diffs = [row["integer_max_lsb_diff"] for row in result["layers"] if "integer_max_lsb_diff" in row]
    assert len(diffs) >= 8 and max(diffs) == 0
    assert result["first_integer_divergence"] is None and result["integer_path_error"] is None


def test_debugger_compares_reference_and_xnnpack_tensor_by_tensor(exported):
    qat, paths, x, _ = exported
    result = debug.debug_fidelity(qat, paths["int8"], x)
    assert result["xnnpack_twin_output_max_lsb_diff"] == 0
    rows = {row["layer"]: row for row in result["layers"]}
    assert all("xnnpack_max_lsb_diff" in rows[name] for name in ("stem", "dw", "add", "pool", "logits", "probs"))
    # the output row against the two interpreters' own outputs
    outs = [TFLiteModel(paths["int8"], name) for name in ("reference", "xnnpack")]
    ref, xnn = (m.invoke_raw(m.quantize_input(x)).astype(np.int64) for m in outs)
    assert rows["probs"]["xnnpack_max_lsb_diff"] == np.abs(ref - xnn).max()
    assert max(row["xnnpack_max_lsb_diff"] for row in rows.values()) > 0  # the runtimes do differ here


def test_integer_path_tells_a_wrong_input_scale_apart(exported):
    """The comparison can fail: perturb one output range and the integer path no longer matches."""
    qat, paths, x, _ = exported
    integer_model = lowering.lower(qat)
    q = integer_model.tensors["quant_add"]
    integer_model.tensors["quant_add"] = lowering.QTensor(q.name, np.float32(q.scale * 1.01), q.zero_point)
    m = TFLiteModel(paths["int8"], "reference")
    codes = m.quantize_input(x)
    assert np.sum(integer_model.run(codes, "reference") != m.invoke_raw(codes)) > 0


def test_lower_names_the_layer_it_cannot_map():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(4, 3, padding="same", use_bias=False)(inp)))
    x = L.Permute((2, 1, 3), name="transpose")(x)
    qat = quantize(keras.Model(inp, L.Dense(2)(L.Flatten()(x))))
    with pytest.raises(ValueError, match="quantize_layer.*empty.*fit it"):
        lowering.lower(qat)  # ranges not set yet
    qat(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32), training=True)
    with pytest.raises(ValueError, match="transpose.*Permute"):
        lowering.lower(qat)


def test_an_op_a_runtime_arithmetic_refuses_falls_back_for_that_runtime(exported, monkeypatch):
    from mobileqat import integer_xnnpack
    qat, paths, x, y = exported

    def refuse(*args, **kwargs):
        raise ValueError("ADD input/output scale ratios are outside XNNPACK's [1/1024, 256)")
    monkeypatch.setattr(integer_xnnpack, "add", refuse)
    result = harness.validate(paths["int8"], x[:32], y[:32], model=qat)
    assert result["runtimes"]["reference"]["simulation"] == "integer"
    assert result["runtimes"]["xnnpack"]["simulation"] == "float"
    assert result["integer_path_error"].startswith("xnnpack: ADD")
    table = debug.format_table(debug.debug_fidelity(qat, paths["int8"], x[:8]))
    assert "ref vs xnnpack not available: ADD" in table
