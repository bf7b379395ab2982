"""Files that deploy below 8 bits: a W4A8 and a mixed-precision (2- to 8-bit weights) QAT model export to
full-integer int8 files that the reference kernels and XNNPACK run, whose int8 weight tensors hold the
n-bit grid each layer's scheme names, and that ``mobileqat.lower`` reproduces at 0 LSB on both runtimes
(tensor by tensor on the reference kernels)."""
import numpy as np
import pytest

from mobileqat import export, harness, lowering, provenance
from mobileqat._tf import keras
from mobileqat.quantize import quantize, scheme_plan
from mobileqat.runtime import TFLiteModel

L = keras.layers

MIXED = {"default": "w4a8",
         "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
                   {"match": {"position": "last"}, "scheme": "w8a8"},
                   {"match": {"name": "proj"}, "scheme": {"weight_bits": 2}},
                   {"match": {"type": "SeparableConv2D"}, "scheme": {"weight_bits": 3}},
                   {"match": {"name": "plain"}, "scheme": {"weight_bits": 6, "per_channel": False}}]}


def mixed_net():
    """16x16x3 -> 5: stem conv+BN+ReLU6 (stride 2), depthwise+BN+ReLU6, 1x1 projection+BN, Add, SeparableConv2D,
    plain Conv2D with bias and ReLU, Conv2DTranspose (stride 2), GAP, Dense, softmax."""
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    x = L.Conv2D(8, 1, activation="relu", name="plain")(x)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(x)
    x = L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Activation("softmax", name="probs")(x), name="mixed_net")


def w4_net():
    """12x12x3 -> 4, every layer 4-bit: conv+BN+ReLU6, depthwise+BN+ReLU6, GAP, Dense(7) on 8 features (packed
    INT4 under "w4a8"), Dense(4) on 7 features (an odd count: int8 tensor on the 4-bit grid)."""
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False,
                                                            name="dw")(x)))
    x = L.Dense(7, activation="relu", name="fc1")(L.GlobalAveragePooling2D()(x))
    x = L.Dense(4, name="fc")(x)
    return keras.Model(inp, L.Activation("softmax")(x), name="w4_net")


def _train_and_export(model, scheme, folder, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    shape = model.input_shape[1:]
    x = rng.uniform(-1, 1, (96,) + shape).astype(np.float32)
    classes = model.output_shape[-1]
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].std(axis=(1, 2)) > 0.577)
    y = y % classes
    plan = scheme_plan(model, scheme)
    qat = quantize(model, scheme)
    qat.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = str(folder / f"{model.name}.tflite")
    export.export_tflite(qat, path)
    return qat, path, plan, x, y


@pytest.fixture(scope="module", params=["mixed", "w4a8"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("low_bits")
    if request.param == "mixed":
        return _train_and_export(mixed_net(), MIXED, folder, 11)
    return _train_and_export(w4_net(), "w4a8", folder, 12)


def _weight_tensors(path):
    """{file op output tensor name: (int8 weight codes, quantized dimension)} of the ops with weights."""
    m = TFLiteModel(path, "reference")
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = {}
    for op in it._get_ops_details():
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
            w = tensors[op["inputs"][1]]
            assert w["dtype"] == np.int8, f"{op['op_name']} weights are {w['dtype']}"
            out[tensors[op["outputs"][0]]["name"]] = (it.get_tensor(w["index"]),
                                                      w["quantization_parameters"]["quantized_dimension"],
                                                      len(w["quantization_parameters"]["scales"]))
    return out


def test_weight_codes_lie_on_each_layers_n_bit_grid(exported):
    qat, path, plan, _, _ = exported
    weights = _weight_tensors(path)
    checked = set()
    for layer, entry in plan.items():
        bits, per_channel = entry["scheme"]["weight_bits"], entry["scheme"]["per_channel"]
        hits = [k for k in weights if f"quant_{layer}/" in k]
        assert len(hits) == 1, (layer, hits)
        codes, axis, n_scales = weights[hits[0]]
        top = 2 ** (bits - 1) - 1
        if _packed(qat, layer):
            assert bits == 4 and n_scales == 1 and np.abs(codes.astype(int)).max() == top, layer
            checked.add(layer)
            continue
        by_channel = np.moveaxis(np.abs(codes.astype(int)), axis, 0).reshape(codes.shape[axis], -1).max(axis=1)
        per_tensor = not per_channel or entry["class"] in ("Dense", "Conv2DTranspose")
        assert (n_scales == 1) == per_tensor, layer
        # on the grid, and using it: the range is max|w| when it was last recorded (the step before the
        # optimizer's last update), so a channel's largest code is the grid's end or a step below
        assert by_channel.max() <= top and by_channel.max() > 2 ** (bits - 2) - 1, (layer, by_channel)
        if not per_tensor:
            assert by_channel.min() >= top - 1, (layer, by_channel)
        checked.add(layer)
    assert checked == set(plan)
    summary = export.weight_summary(path)
    expected = {}
    for layer, entry in plan.items():
        key = f"{entry['scheme']['weight_bits']}-bit in int8"
        if _packed(qat, layer):
            key = "int4 packed"
        expected[key] = expected.get(key, 0) + 1
    assert summary["grids"] == dict(sorted(expected.items()))
    assert summary["weight_tensors"] == len(plan)
    assert 0 < summary["gzip_bytes"] < summary["bytes"]


def _packed(qat, layer):
    config = getattr(qat.get_layer(f"quant_{layer}"), "quantize_config", None)
    return bool(getattr(getattr(config, "weight_quantizer", None), "packed_int4", False))


def test_w4a8_packs_dense_layers_with_an_even_input_count(exported):
    qat, path, plan, _, _ = exported
    packed = sorted(layer for layer in plan if _packed(qat, layer))
    assert packed == (["fc1"] if "fc1" in plan else [])
    if packed:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
        root = flatbuffer_utils.read_model_from_bytearray(bytearray(open(path, "rb").read()))
        int4 = [t for t in root.subgraphs[0].tensors if t.type == schema.TensorType.INT4]
        assert len(int4) == 1 and b"quant_fc1/" in int4[0].name
        assert len(root.buffers[int4[0].buffer].data) == 7 * 8 // 2  # two codes a byte


def test_the_file_uses_int8_op_versions_the_reference_kernels_register(exported):
    """An n-bit FakeQuant made TF 2.21's converter mark CONV_2D / DEPTHWISE_CONV_2D version 7 and
    FULLY_CONNECTED version 10 (its int4-filter versions), which the reference kernels refuse; mobileqat's
    8-bit FakeQuant on the n-bit grid gets the int8 versions."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    _, path, _, _, _ = exported
    root = flatbuffer_utils.read_model_from_bytearray(bytearray(open(path, "rb").read()))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    versions = {names[max(c.builtinCode, c.deprecatedBuiltinCode)]: c.version for c in root.operatorCodes}
    assert versions.get("CONV_2D", 3) == 3 and versions.get("DEPTHWISE_CONV_2D", 3) == 3
    assert versions.get("FULLY_CONNECTED", 4) in (4, 10)  # 10: int4 weights (a packed Dense), which both run
    assert export.tensor_types(path)["float_ops"] == []


def test_lowered_weights_equal_the_files_and_runs_match_reference_tensor_by_tensor(exported):
    qat, path, _, x, _ = exported
    twin = lowering.lower(qat)
    m = TFLiteModel(path, "reference", preserve_all_tensors=True)
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    mapped = provenance.file_tensors(twin, path)
    ops_by_output = {op["outputs"][0]: op for op in it._get_ops_details()}
    for op in twin.ops:
        if "weights" in op.params and op.output in mapped:
            fop = ops_by_output[mapped[op.output]]
            np.testing.assert_array_equal(it.get_tensor(fop["inputs"][1]), op.params["weights"], err_msg=op.output)
            np.testing.assert_array_equal(tensors[fop["inputs"][1]]["quantization_parameters"]["scales"],
                                          np.atleast_1d(op.params["filter_scales"]), err_msg=op.output)
    codes = m.quantize_input(x[:1])
    m.invoke_raw(codes)
    values = twin.run(codes, "reference", keep_all=True)
    for name, index in mapped.items():
        expected = it.get_tensor(index)
        np.testing.assert_array_equal(values[name].reshape(expected.shape), expected, err_msg=name)


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_integer_twin_matches_the_file_at_0_lsb(exported, runtime):
    qat, path, _, x, y = exported
    m = TFLiteModel(path, runtime)
    codes = m.quantize_input(x)
    out = np.concatenate([m.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), out)


def test_harness_reports_the_integer_path_at_0_lsb(exported):
    qat, path, _, x, y = exported
    result = harness.validate(path, x, y, model=qat)
    assert "integer_path_error" not in result
    for runtime in ("reference", "xnnpack"):
        r = result["runtimes"][runtime]
        assert r["simulation"] == "integer" and r["max_lsb_diff"] == 0, (runtime, r)
