"""Grouped convolutions (Conv2D(groups=g), 1 < g < input channels) lowered from a QAT model against the
interpreter, bit for bit, on the reference kernels and on the default path (XNNPACK).

The converter writes one int8 CONV_2D per grouped convolution, its filter (C_out, kh, kw, C_in / g); the
kernels read the groups from the tensors (input channels / filter input channels) and XNNPACK delegates it.
Two tiny models, fitted briefly and exported once each (module fixture):
  "grouped":  input 10x10x6 -> Conv2D(12, 3, groups=3) + BN + ReLU (folded) -> Conv2D(8, 3, strides 2,
              valid, groups=2, bias, no BN) -> Conv2D(8, 1, groups=4) + BN -> GAP -> Dense
  "x_block":  RegNetX's block, as tf_keras.applications.RegNetX002 writes it: stem 3x3/2 conv+BN+ReLU,
              1x1 conv+BN+ReLU, 3x3/2 grouped conv (group width 8, groups 3)+BN+ReLU, 1x1 conv+BN,
              a 1x1/2 conv+BN shortcut, ``x + skip`` (a TF op), ReLU, GAP, Dense + softmax
"""
import numpy as np
import pytest

from mobileqat import export, integer, lowering, provenance
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel, run_isolated, xnnpack_coverage

L = keras.layers


def grouped_model():
    inp = keras.Input((10, 10, 6))
    x = L.Conv2D(12, 3, padding="same", groups=3, use_bias=False, name="g3")(inp)
    x = L.ReLU(name="g3_relu")(L.BatchNormalization(name="g3_bn")(x))
    x = L.Conv2D(8, 3, strides=2, groups=2, name="g2_plain")(x)                      # 4x4, own bias
    x = L.BatchNormalization(name="g4_bn")(L.Conv2D(8, 1, groups=4, use_bias=False, name="g4")(x))
    return keras.Model(inp, L.Dense(5, name="fc")(L.GlobalAveragePooling2D(name="gap")(x)), name="grouped")


def x_block_model():
    """Stem and one X block of tf_keras' RegNet (regnet.py: XBlock with group width 8)."""
    def conv_bn(x, filters, kernel, strides=1, groups=1, relu=True, name=""):
        x = L.Conv2D(filters, kernel, strides=strides, padding="same", groups=groups, use_bias=False,
                     name=f"{name}_conv")(x)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
        return L.ReLU(name=f"{name}_relu")(x) if relu else x

    inp = keras.Input((16, 16, 3))
    x = conv_bn(inp, 16, 3, strides=2, name="stem")                                  # 8x8x16
    skip = conv_bn(x, 24, 1, strides=2, relu=False, name="skip")
    x = conv_bn(x, 24, 1, name="conv_1x1_1")
    x = conv_bn(x, 24, 3, strides=2, groups=3, name="conv_3x3")                      # 4x4x24, groups 3
    x = conv_bn(x, 24, 1, relu=False, name="conv_1x1_2")
    x = L.ReLU(name="exit_relu")(x + skip)
    x = L.Dense(10, activation="softmax", name="predictions")(L.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inp, x, name="x_block")


def _fit_export(model, shape, seed, folder, loss):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    qat = quantize(model)
    x = rng.uniform(-1, 1, (64,) + shape).astype(np.float32)
    qat.compile(keras.optimizers.Adam(1e-2), loss)
    target = rng.integers(0, 10, 64) if loss != "mse" else np.asarray(qat(x)) * 1.2 + 0.1
    qat.fit(x, target, epochs=1, batch_size=16, verbose=0)
    path = str(folder / f"{model.name}.tflite")
    export.export_tflite(qat, path)
    codes = np.concatenate([rng.integers(-128, 128, (40,) + shape), np.full((1,) + shape, -128),
                            np.full((1,) + shape, 127)]).astype(np.int8)
    return qat, path, codes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    return {"grouped": _fit_export(grouped_model(), (10, 10, 6), 21, folder, "mse"),
            "x_block": _fit_export(x_block_model(), (16, 16, 3), 22, folder, "sparse_categorical_crossentropy")}


def _conv_filters(path):
    """[(filter shape, input channels)] of the file's CONV_2D ops, in file order."""
    it = TFLiteModel(path, "reference").interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    return [(tuple(tensors[o["inputs"][1]]["shape"]), int(tensors[o["inputs"][0]]["shape"][-1]))
            for o in it._get_ops_details() if o["op_name"] == "CONV_2D"]


def test_quantize_folds_grouped_convs_with_their_batchnorm(files):
    qat, _, _ = files["x_block"]
    inner = {la.name: getattr(la, "layer", la) for la in qat.layers}
    folded = inner["quant_conv_3x3_conv"]
    assert type(folded).__name__ == "FoldedConvBN" and folded.groups == 3
    assert tuple(folded.kernel.shape) == (3, 3, 8, 24)
    assert not any(type(la).__name__ == "BatchNormalization" for la in inner.values())


def test_the_converter_writes_one_conv_per_grouped_convolution(files):
    """The filter holds C_in / groups input channels; no SPLIT or CONCATENATION around it."""
    assert _conv_filters(files["grouped"][1]) == [((12, 3, 3, 2), 6), ((8, 3, 3, 6), 12), ((8, 1, 1, 2), 8)]
    assert ((24, 3, 3, 8), 24) in _conv_filters(files["x_block"][1])
    for name in ("grouped", "x_block"):
        ops = run_isolated(xnnpack_coverage, files[name][1])[0]
        assert "CONV_2D" not in ops["left"], (name, ops)  # XNNPACK runs them (int8 SOFTMAX it leaves)


@pytest.mark.parametrize("name", ["grouped", "x_block"])
def test_provenance_finds_no_difference(files, name):
    qat, path, _ = files[name]
    assert provenance.first_difference(lowering.lower(qat), path) is None


@pytest.mark.parametrize("name", ["grouped", "x_block"])
def test_twin_equals_reference_kernels_tensor_by_tensor(files, name):
    qat, path, codes = files[name]
    twin = lowering.lower(qat)
    m = TFLiteModel(path, "reference", preserve_all_tensors=True)
    out = m.invoke_raw(codes)
    values = twin.run(codes, "reference", keep_all=True)
    mapped = provenance.file_tensors(twin, path)
    for tensor_name, index in mapped.items():
        expected = m.interpreter.get_tensor(index)
        np.testing.assert_array_equal(values[tensor_name].reshape(expected.shape), expected, err_msg=tensor_name)
    grouped = [op.output for op in twin.ops
               if op.kind == "conv2d" and op.params["weights"].shape[-1] != values[op.inputs[0]].shape[-1]]
    assert len(grouped) == {"grouped": 3, "x_block": 1}[name] and set(grouped) <= set(mapped)
    np.testing.assert_array_equal(twin.run(codes, "reference"), out)


@pytest.mark.parametrize("name", ["grouped", "x_block"])
def test_twin_equals_xnnpack_output(files, name):
    qat, path, codes = files[name]
    out = TFLiteModel(path, "xnnpack").invoke_raw(codes)
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, "xnnpack"), out)


def _grouped_conv_numpy(x, zp_in, w, bias):
    """int32 accumulators of a grouped CONV_2D written out: per group g, the input channels of g against
    filters of g, SAME padding by skipping positions outside the image (conv.h)."""
    n, h, wd, cin = x.shape
    cout, kh, kw, per = w.shape
    out_per = cout // (cin // per)  # output channels per group
    acc = np.zeros((n, h, wd, cout), np.int64) + np.asarray(bias, np.int64)
    xi = x.astype(np.int64) - zp_in
    for o in range(cout):
        g = o // out_per
        for i in range(kh):
            for j in range(kw):
                di, dj = i - (kh - 1) // 2, j - (kw - 1) // 2
                ys, xs = slice(max(0, -di), min(h, h - di)), slice(max(0, -dj), min(wd, wd - dj))
                src = xi[:, max(0, di):min(h, h + di), max(0, dj):min(wd, wd + dj), g * per:(g + 1) * per]
                acc[:, ys, xs, o] += src @ w[o, i, j].astype(np.int64)
    return acc


@pytest.mark.parametrize("groups,cout", [(2, 6), (3, 3), (4, 8), (6, 12), (12, 24)])
def test_grouped_accumulators_equal_the_definition(groups, cout, rng):
    """The twin's block-diagonal weights give the accumulators of one convolution per group (numpy, no BLAS),
    and each group's output channels depend on that group's input channels only."""
    x = rng.integers(-128, 128, (3, 7, 6, 12)).astype(np.int8)
    w = rng.integers(-127, 128, (cout, 3, 3, 12 // groups)).astype(np.int8)
    bias = rng.integers(-5000, 5000, cout).astype(np.int32)
    acc = integer.conv_accumulators(x, -3, w, bias, padding="SAME")
    np.testing.assert_array_equal(acc, _grouped_conv_numpy(x, -3, w, bias))
    x2 = x.copy()
    x2[..., :12 // groups] = 0  # change group 0's input only
    acc2 = integer.conv_accumulators(x2, -3, w, bias, padding="SAME")
    out_per = cout // groups
    assert np.any(acc2[..., :out_per] != acc[..., :out_per])
    np.testing.assert_array_equal(acc2[..., out_per:], acc[..., out_per:])


def test_kernels_refuse_a_filter_whose_groups_do_not_divide():
    x = np.zeros((1, 4, 4, 6), np.int8)
    w = np.zeros((5, 3, 3, 3), np.int8)  # groups 2, but 5 output channels
    for arith in (integer, __import__("mobileqat.integer_xnnpack", fromlist=["conv2d"])):
        with pytest.raises(ValueError, match="CONV_2D: the input has 6 channels and the filter \\(5, 3, 3, 3\\)"):
            arith.conv2d(x, np.float32(0.1), 0, w, np.full(5, 0.01, np.float32), np.zeros(5, np.int32),
                         np.float32(0.1), 0)
