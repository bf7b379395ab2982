"""Pooling, padding and cropping ops (mobileqat.ops.pooling) lowered from a QAT model against the
interpreter, bit for bit, on the reference kernels and on the default path (XNNPACK).

Two tiny chains, fitted briefly and exported once each (module fixture):
  "pools": input -> ZeroPadding2D asymmetric -> AveragePooling2D 2 valid -> AveragePooling2D 3/2 same
           -> MaxPooling2D 3/1 same -> conv+BN -> ZeroPadding2D 1 -> MaxPooling2D 3/2 valid
           -> Cropping2D -> GlobalMaxPooling2D -> Dense
  "means": input -> MaxPooling2D 2/2 same (odd sizes) -> conv+BN+ReLU6 -> AveragePooling2D 2/1 same
           -> GlobalAveragePooling2D(keepdims=True)
The first ops read the model's int8 input, so the input codes below reach the average pools directly:
every code from -128 to 127, window sums with ties (x.5) of both signs, constant images at the clamps.
"""
import itertools

import numpy as np
import pytest

from mobileqat import export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.ops import pooling
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def pools_model():
    inp = keras.Input((14, 13, 4))
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad_asym")(inp)                        # 15x14
    x = L.AveragePooling2D(2, strides=1, name="avg_valid")(x)                          # 14x13, count 4
    x = L.AveragePooling2D(3, strides=2, padding="same", name="avg_same")(x)           # 7x7, counts 9/6/4
    x = L.MaxPooling2D(3, strides=1, padding="same", name="max_same")(x)               # 7x7
    x = L.BatchNormalization(name="bn")(L.Conv2D(6, 3, padding="same", use_bias=False, name="conv")(x))
    x = L.ZeroPadding2D(1, name="pad_sym")(x)                                          # 9x9
    x = L.MaxPooling2D(3, strides=2, name="max_valid")(x)                              # 4x4
    x = L.Cropping2D(((1, 0), (0, 1)), name="crop")(x)                                 # 3x3
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    return keras.Model(inp, L.Dense(3, name="fc")(x), name="pools")


def means_model():
    inp = keras.Input((9, 11, 3))
    x = L.MaxPooling2D(2, padding="same", name="max2_same")(inp)                       # 5x6
    x = L.BatchNormalization(name="bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x))
    x = L.ReLU(6.0, name="relu")(x)
    x = L.AveragePooling2D(2, strides=1, padding="same", name="avg2_same")(x)          # 5x6, counts 4/2/1
    return keras.Model(inp, L.GlobalAveragePooling2D(keepdims=True, name="gap_keep")(x), name="means")


def input_codes(shape, rng, n_random=48):
    """int8 codes: uniform over all codes, two-level checkerboards a/a+1 (2x2 sums 4a+2: ties of
    either sign), images constant per channel at -128 or 127 in every sign pattern (one of them drives
    each conv output channel as high as it goes: clamps), and a constant 0."""
    codes = [rng.integers(-128, 128, (n_random,) + shape)]
    h, w, c = shape
    board = (np.add.outer(np.arange(h), np.arange(w)) % 2)[None, :, :, None]
    levels = np.array([-128, -101, -7, -2, -1, 0, 1, 6, 77, 126])
    codes.append(np.broadcast_to(levels[:, None, None, None] + board, (len(levels),) + shape))
    corners = np.array(list(itertools.product((-128, 127), repeat=c)))
    codes.append(np.broadcast_to(corners[:, None, None, :], (len(corners),) + shape))
    codes.append(np.zeros((1,) + shape))
    return np.concatenate(codes).astype(np.int8)


def _fit_export(model, shape, seed, folder, density=1.0):
    """QAT model fitted for one epoch on uniform [-1, 1] images with a fraction ``density`` of pixels
    set (sparse images give output ranges that dense input codes overflow: clamps), exported."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    qat = quantize(model)
    x = (rng.uniform(-1, 1, (64,) + shape) * (rng.random((64,) + shape) < density)).astype(np.float32)
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    target = np.asarray(qat(x)) * 1.2 + 0.1
    qat.fit(x, target, epochs=1, batch_size=16, verbose=0)
    path = str(folder / f"{model.name}.tflite")
    export.export_tflite(qat, path)
    return qat, path, input_codes(shape, rng)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pooling")
    return {"pools": _fit_export(pools_model(), (14, 13, 4), 11, folder),
            "means": _fit_export(means_model(), (9, 11, 3), 12, folder, density=0.1)}


def _graph(path):
    """[(op name, builtin options, input tensors, output tensor)] of the file, run on the reference
    kernels with every tensor kept (``run``)."""
    from ai_edge_litert import schema_py_generated as schema
    with open(path, "rb") as f:
        flat = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0).subgraphs[0].operators
    m = TFLiteModel(path, "reference", preserve_all_tensors=True)
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = [(o["op_name"], fo.builtinOptions, [tensors[i] for i in o["inputs"]], tensors[o["outputs"][0]])
           for o, fo in zip(it._get_ops_details(), flat)]
    return m, ops


def _pairs(integer_model, ops):
    """(file op, twin op) in order; the file's RESHAPEs and the twin's reshapes left out."""
    file_ops = [op for op in ops if op[0] != "RESHAPE"]
    twin_ops = [op for op in integer_model.ops if op.kind in lowering.TFLITE_OPS]
    assert [op[0] for op in file_ops] == [lowering.TFLITE_OPS[op.kind] for op in twin_ops]
    return list(zip(file_ops, twin_ops))


def test_the_converter_writes_the_pooling_ops_with_the_inputs_quantization(files):
    for name, expected in (("pools", ["PAD", "AVERAGE_POOL_2D", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONV_2D", "PAD",
                                      "MAX_POOL_2D", "STRIDED_SLICE", "REDUCE_MAX", "FULLY_CONNECTED"]),
                           ("means", ["MAX_POOL_2D", "CONV_2D", "AVERAGE_POOL_2D", "MEAN"])):
        qat, path, _ = files[name]
        _, ops = _graph(path)
        assert [op[0] for op in ops] == expected  # no QUANTIZE: the pooling layers keep their input's scale
        for (op_name, options, ins, out), (_, lop) in zip(ops, _pairs(lowering.lower(qat), ops)):
            if op_name in ("CONV_2D", "FULLY_CONNECTED", "MEAN"):
                continue
            assert out["quantization"] == ins[0]["quantization"], op_name
            p = lop.params
            if op_name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
                assert ((options.filterHeight, options.filterWidth), (options.strideH, options.strideW),
                        ("SAME", "VALID")[options.padding], options.fusedActivationFunction) == \
                    (p["pool"], p["stride"], p["padding"], 0)
            if op_name == "PAD":
                m = TFLiteModel(path, "reference").interpreter
                np.testing.assert_array_equal(m.get_tensor(ins[1]["index"]),
                                              [[0, 0], *p["paddings"], [0, 0]])
        if name == "means":
            mean = ops[-1]
            assert mean[1].keepDims and mean[3]["quantization"] != mean[2][0]["quantization"]  # requantizes


@pytest.mark.parametrize("name", ["pools", "means"])
def test_twin_equals_reference_kernels_tensor_by_tensor(files, name):
    qat, path, codes = files[name]
    integer_model = lowering.lower(qat)
    m, ops = _graph(path)
    out = m.invoke_raw(codes)
    values = integer_model.run(codes, "reference", keep_all=True)
    it = m.interpreter
    for (op_name, _, _, t_out), lop in _pairs(integer_model, ops):
        expected = it.get_tensor(t_out["index"])
        np.testing.assert_array_equal(values[lop.output].reshape(expected.shape), expected,
                                      err_msg=f"{op_name} ({lop.output})")
    np.testing.assert_array_equal(integer_model.run(codes, "reference"), out)


@pytest.mark.parametrize("name", ["pools", "means"])
def test_twin_equals_xnnpack_output(files, name):
    qat, path, codes = files[name]
    integer_model = lowering.lower(qat)
    out = TFLiteModel(path, "xnnpack").invoke_raw(codes)
    np.testing.assert_array_equal(integer_model.run(codes, "xnnpack"), out)


def _ops_outside_the_delegate(path, codes):
    """Names of the file's ops that XNNPACK leaves to the builtin kernels on the default path (a chain:
    each DELEGATE node replaces the run of ops from its activation input to its output)."""
    m = TFLiteModel(path, "xnnpack")
    m.invoke_raw(codes[:1])
    details = m.interpreter._get_ops_details()
    ops = [o for o in details if o["op_name"] != "DELEGATE"]
    produced = {o["outputs"][0]: i for i, o in enumerate(ops)}
    inside = [False] * len(ops)
    for node in (o for o in details if o["op_name"] == "DELEGATE"):
        (source,) = [t for t in node["inputs"] if t in produced or t == m.input["index"]]
        start = next(i for i, o in enumerate(ops) if source in o["inputs"])
        for i in range(start, produced[node["outputs"][0]] + 1):
            inside[i] = True
    return [o["op_name"] for o, delegated in zip(ops, inside) if not delegated]


def test_xnnpack_takes_every_op_but_average_pool(files):
    """The delegate takes int8 MAX_POOL_2D, PAD, STRIDED_SLICE, REDUCE_MAX and MEAN; AVERAGE_POOL_2D
    (float only in xnnpack_delegate.cc) runs on the optimized builtin kernel, whose integers the
    reference arithmetic gives."""
    for name, outside in (("pools", ["AVERAGE_POOL_2D", "AVERAGE_POOL_2D"]), ("means", ["AVERAGE_POOL_2D"])):
        _, path, codes = files[name]
        assert _ops_outside_the_delegate(path, codes) == outside, name


@pytest.mark.parametrize("name", ["pools", "means"])
def test_provenance_finds_no_difference(files, name):
    qat, path, _ = files[name]
    assert provenance.first_difference(lowering.lower(qat), path) is None


def test_average_pool_rounding_and_count_are_exercised(files):
    """The codes hit ties of both signs and 'same' windows cut by the border: rounding ties toward +inf,
    or counting the padding, gives other integers than the kernels on these tensors."""
    qat, path, codes = files["pools"]
    m, ops = _graph(path)
    m.invoke_raw(codes)
    it = m.interpreter
    avg_ops = [op for op in ops if op[0] == "AVERAGE_POOL_2D"]
    assert len(avg_ops) == 2
    for (_, options, (t_in,), t_out), padding in zip(avg_ops, ("VALID", "SAME")):
        x, y = it.get_tensor(t_in["index"]).astype(np.int64), it.get_tensor(t_out["index"])
        pool, stride = (options.filterHeight, options.filterWidth), (options.strideH, options.strideW)
        q = (np.float32(t_in["quantization"][0]), t_in["quantization"][1])
        np.testing.assert_array_equal(pooling.average_pool2d([x], [q], q, pool, stride, padding), y)
        win = pooling._windows(x, pool, stride, padding, 0)
        acc = win.sum(axis=(3, 4))
        count = pooling._windows(np.ones_like(x), pool, stride, padding, 0).sum(axis=(3, 4))
        ties_up = np.floor(acc / count + 0.5).astype(np.int64)
        assert np.sum((ties_up != y) & (acc < 0)) > 10  # negative ties go away from zero
        assert np.sum((2 * acc % count == 0) & (acc % count != 0) & (acc > 0)) > 10  # positive ties too
        if padding == "SAME":
            full = np.trunc(acc / np.prod(pool) + np.sign(acc) * 0.5).astype(np.int64)
            assert np.sum(full != y) > 10  # dividing by the full window would differ at the border


def test_mean_keepdims_tells_the_runtimes_apart(files):
    """On XNNPACK the twin's MEAN uses XNNPACK's float requantization; the reference kernels' fixed-point
    MEAN, applied to the same int8 input, gives other integers somewhere."""
    from mobileqat import integer
    qat, path, codes = files["means"]
    integer_model = lowering.lower(qat)
    out = TFLiteModel(path, "xnnpack").invoke_raw(codes)
    values = integer_model.run(codes, "xnnpack", keep_all=True)
    mean = integer_model.ops[-1]
    assert (mean.kind, mean.params) == ("mean_hw", {"keepdims": True}) and out.shape == (len(codes), 1, 1, 8)
    np.testing.assert_array_equal(values[mean.output], out)
    t_in, t_out = integer_model.tensors[mean.inputs[0]], integer_model.tensors[mean.output]
    ref = integer.mean_hw(values[mean.inputs[0]], t_in.scale, t_in.zero_point, t_out.scale, t_out.zero_point)
    assert np.any(ref.reshape(out.shape) != out)
    assert np.any(out == -128) and np.any(out == 127)  # the output clamps at both ends


def test_kernels_refuse_a_rescaling_pool():
    x = np.zeros((1, 4, 4, 2), np.int8)
    with pytest.raises(ValueError, match="AVERAGE_POOL_2D keeps its input's quantization"):
        pooling.average_pool2d([x], [(np.float32(0.1), 0)], (np.float32(0.2), 0), (2, 2), (2, 2), "VALID")


def test_lower_refuses_an_average_pool_with_its_own_output_range(monkeypatch):
    """A QAT model whose AveragePooling2D has an output quantizer (as mobileqat once gave it) does not
    lower: the converter writes AVERAGE_POOL_2D + QUANTIZE, which the twin does not reproduce."""
    import importlib
    quantize_module = importlib.import_module("mobileqat.quantize")  # mobileqat.quantize is also the function
    monkeypatch.setattr(quantize_module, "_REQUANTIZE", quantize_module._REQUANTIZE + (L.AveragePooling2D,))
    inp = keras.Input((6, 6, 2))
    x = L.BatchNormalization()(L.Conv2D(3, 3, use_bias=False)(inp))
    qat = quantize(keras.Model(inp, L.Flatten()(L.AveragePooling2D(name="avg")(x))))
    qat(np.random.default_rng(0).uniform(-1, 1, (4, 6, 6, 2)).astype(np.float32), training=True)
    with pytest.raises(ValueError, match="'quant_avg' \\(AveragePooling2D\\).*own output range.*QUANTIZE"):
        lowering.lower(qat)
