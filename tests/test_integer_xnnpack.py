"""numpy XNNPACK arithmetic (mobileqat.integer_xnnpack) vs the LiteRT interpreter's default path
(OpResolverType.AUTO, XNNPACK delegate), bit for bit.

XNNPACK keeps no intermediate tensors, so every model here ends with the op under test and the
numpy side chains its own ops from the model's int8 input; only the final output is compared.
Each test also checks that the reference-kernel arithmetic (mobileqat.integer) applied to the same
inputs of the op under test gives a different answer somewhere, i.e. that it tells the two apart.
Where the two agree on all but ~1 in 10^4..10^5 values, the exported file is rewritten (scales,
weights) to a case where they differ often, after a check with the trained values.
"""
import numpy as np
import pytest

from mobileqat import export, integer, integer_xnnpack
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers

_ACTIVATIONS = {0: None, 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}


def _load_flatbuffer(path):
    from ai_edge_litert import schema_py_generated as schema
    with open(path, "rb") as f:
        return schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)


def read_graph(path):
    """The ops of a .tflite file as dicts (name, inputs, outputs, builtin options), tensor details by
    index (constants in "const"), and a reference-kernel TFLiteModel of the file."""
    model = _load_flatbuffer(path)
    m = TFLiteModel(path, "reference")
    it = m.interpreter
    ops = it._get_ops_details()
    flat_ops = model.subgraphs[0].operators
    assert len(ops) == len(flat_ops)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    for idx, t in tensors.items():
        buf = model.buffers[model.subgraphs[0].tensors[idx].buffer]
        t["const"] = it.get_tensor(idx) if buf.data is not None and len(buf.data) else None
    graph = [dict(name=o["op_name"], inputs=[int(i) for i in o["inputs"]], outputs=[int(i) for i in o["outputs"]],
                  options=flat.builtinOptions) for o, flat in zip(ops, flat_ops)]
    return graph, tensors, m


def rewrite(path, quantization=None, data=None):
    """Rewrite tensors of a .tflite file: quantization {tensor index: (scales, zero points)} and
    constant data {tensor index: numpy array}."""
    import flatbuffers
    model = _load_flatbuffer(path)
    tensors = model.subgraphs[0].tensors
    for index, (scales, zero_points) in (quantization or {}).items():
        q = tensors[index].quantization
        q.scale = [float(np.float32(s)) for s in np.ravel(scales)]
        q.zeroPoint = [int(z) for z in np.ravel(zero_points)]
    for index, values in (data or {}).items():
        model.buffers[tensors[index].buffer].data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    export.write_atomic(path, bytes(builder.Output()))


def _q(t):
    scale, zero = t["quantization"]
    return np.float32(scale), int(zero)


def run_numpy(path, xq, mod, until=None):
    """Chain ``mod``'s ops (integer or integer_xnnpack) from the int8 model input ``xq``; returns
    {tensor index: int8 array}. Stops before the first op named ``until``."""
    graph, tensors, m = read_graph(path)
    values = {int(m.input["index"]): np.asarray(xq)}
    for op in graph:
        name, ins, out, opt = op["name"], op["inputs"], op["outputs"][0], op["options"]
        if name == until:
            break
        t_in, t_out = tensors[ins[0]], tensors[out]
        (si, zi), (so, zo) = _q(t_in), _q(t_out)
        act = getattr(opt, "fusedActivationFunction", 0)
        act_range = mod.activation_range(_ACTIVATIONS[act], so, zo) if act else (-128, 127)
        x = values[ins[0]]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            t_w, t_b = tensors[ins[1]], tensors[ins[2]]
            fn = mod.conv2d if name == "CONV_2D" else mod.depthwise_conv2d
            if name == "DEPTHWISE_CONV_2D":
                assert opt.depthMultiplier in (0, 1)
            y = fn(x, si, zi, t_w["const"], t_w["quantization_parameters"]["scales"], t_b["const"], so, zo,
                   stride=(opt.strideH, opt.strideW), padding=("SAME", "VALID")[opt.padding],
                   act_range=act_range)
        elif name == "ADD":
            s2, z2 = _q(tensors[ins[1]])
            y = mod.add(x, si, zi, values[ins[1]], s2, z2, so, zo, act_range=act_range)
        elif name == "MEAN":
            axes = sorted(int(a) for a in np.ravel(tensors[ins[1]]["const"]))
            assert axes == [1, 2] and not opt.keepDims
            y = mod.mean_hw(x, si, zi, so, zo)
        elif name == "FULLY_CONNECTED":
            t_w = tensors[ins[1]]
            bias = tensors[ins[2]]["const"] if len(ins) > 2 and ins[2] >= 0 else None
            y = mod.fully_connected(x.reshape(len(x), -1), si, zi, t_w["const"],
                                    t_w["quantization_parameters"]["scales"], bias, so, zo, act_range=act_range)
        elif name == "SOFTMAX":
            assert so == np.float32(1 / 256)
            y = mod.softmax(x, si, zi, beta=opt.beta, output_zero_point=zo)
        else:
            raise NotImplementedError(name)
        values[out] = y
    return values


def _export(tmp_path, model, x, seed, name="m.tflite", target=None):
    qat = quantize(model)
    qat.compile("adam", "mse")
    y = np.asarray(qat(x)) * 1.1 if target is None else target
    qat.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / name)
    export.export_tflite(qat, path)
    return path


class _Hybrid:
    """integer_xnnpack, except the function ``name`` (the op under test) from mobileqat.integer: the
    reference arithmetic applied to the exact XNNPACK inputs of the last op."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, name):
        return getattr(integer if name == self.name else integer_xnnpack, name)


def _check(path, x, op_names, fn_name, xq=None):
    """Run XNNPACK on the file (float input x, or int8 input xq); chain our numpy ops from its int8
    input; return (XNNPACK output, ours, ours with the last op ``fn_name`` from mobileqat.integer)."""
    m = TFLiteModel(path, "xnnpack")
    xq = m.quantize_input(x) if xq is None else xq
    graph, _, _ = read_graph(path)
    names = [op["name"] for op in graph]
    assert names[-1] == op_names[-1] and set(names) <= set(op_names), names
    out = m.invoke_raw(xq)
    out_index = int(m.output["index"])
    ours = run_numpy(path, xq, integer_xnnpack)[out_index]
    ref = run_numpy(path, xq, _Hybrid(fn_name))[out_index]
    assert ours.shape == out.shape and ours.dtype == out.dtype
    return out, ours, ref


def _assert_exact_and_distinct(out, ours, ref):
    np.testing.assert_array_equal(ours, out)
    assert np.sum(ref != out) > 0, "the reference arithmetic agrees here too: the test cannot tell them apart"


def _conv_model(kind, stride, activation, shape=(11, 11, 6), filters=8):
    inp = keras.Input(shape)
    if kind == "conv":
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(inp)
    else:
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(inp)
    y = L.BatchNormalization()(y)
    if activation:
        y = L.ReLU(6.0)(y)
    return keras.Model(inp, y)


@pytest.mark.parametrize("kind,stride,activation", [("conv", 1, True), ("conv", 2, True), ("conv", 1, False),
                                                     ("depthwise", 1, True), ("depthwise", 2, True)])
def test_conv_and_depthwise_equal_xnnpack(tmp_path, kind, stride, activation):
    seed = 10 * stride + activation + (kind == "depthwise") * 100
    keras.utils.set_random_seed(seed)
    x = np.random.default_rng(seed).uniform(-1, 1, (64, 11, 11, 6)).astype(np.float32)
    path = _export(tmp_path, _conv_model(kind, stride, activation), x, seed)
    op = "CONV_2D" if kind == "conv" else "DEPTHWISE_CONV_2D"
    # reference: two roundings (Q31 high mul, then rounding shift); XNNPACK: one float32 rounding
    out, ours, ref = _check(path, x, (op,), "conv2d" if kind == "conv" else "depthwise_conv2d")
    _assert_exact_and_distinct(out, ours, ref)


def _add_file(tmp_path, shape=(16, 16, 2)):
    """Add(input, conv1x1(input)), trained, exported: (path, x, conv op, add op, tensors)."""
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(3).uniform(-1, 1, (256,) + shape).astype(np.float32)
    inp = keras.Input(shape)
    b = L.BatchNormalization(name="bn_b")(L.Conv2D(2, 1, use_bias=False, name="b")(inp))
    qat = quantize(keras.Model(inp, L.Add(name="add")([inp, b])))
    wrapper = next(layer for layer in qat.layers if layer.name == "quant_b")
    gamma = next(w for w in wrapper.trainable_weights if "gamma" in w.name)
    gamma.assign(gamma * 5.0)  # branch b gets a much wider range than the input
    qat.compile("adam", "mse")
    qat.fit(x, np.zeros((256,) + shape), epochs=1, batch_size=64, verbose=0)
    path = str(tmp_path / "add.tflite")
    export.export_tflite(qat, path)
    graph, tensors, _ = read_graph(path)
    conv, add = graph
    return path, x, conv, add, tensors


def _rewrite_as_channel_swap(path, conv, add, s_in, z_in, ratio, s_o, z_o):
    """The conv becomes an exact channel swap (weights [[0,1],[1,0]], requantization scale 1) into an
    ADD input of scale s_in*ratio, so a grid input feeds the ADD every (x1, x2) pair."""
    s_in, ratio = np.float32(s_in), np.float32(ratio)
    s2 = s_in * ratio  # in float32: the conv's requantization scale fl(s_in * ratio) / s2 is exactly 1
    rewrite(path, quantization={conv["inputs"][0]: ([s_in], [z_in]), conv["outputs"][0]: ([s2], [z_in]),
                                conv["inputs"][1]: ([ratio, ratio], [0, 0]), add["outputs"][0]: ([s_o], [z_o])},
            data={conv["inputs"][1]: np.array([[[[0, 1]]], [[[1, 0]]]], np.int8),
                  conv["inputs"][2]: np.zeros(2, np.int32)})


_ALL_PAIRS = np.stack(np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij"), -1) \
    .reshape(256, 16, 16, 2).astype(np.int8)  # channel 0 = x1, channel 1 -> x2: all pairs


def test_add_of_different_scales_equals_xnnpack(tmp_path):
    """First the trained file on real data; then, rewritten as a channel swap, the ADD is checked
    exhaustively (every (x1, x2) pair) for several scale sets."""
    path, x, conv, add, tensors = _add_file(tmp_path)
    s1, s2 = (_q(tensors[i])[0] for i in add["inputs"])
    assert max(s1, s2) / min(s1, s2) > 2  # the case that needs rescaling
    out, ours, ref = _check(path, x, ("CONV_2D", "ADD"), "add")
    np.testing.assert_array_equal(ours, out)

    xq = _ALL_PAIRS
    s_out, z_out = _q(tensors[add["outputs"][0]])
    # (input scale, input zero point, ADD input-2 scale = input scale * 4 or the trained ratio, output)
    cases = [(s1, -3, s2 / s1, s_out, z_out), (0.0123, 7, 0.21 / 0.0123, 0.05, -20),
             (0.02, -100, 3.0, 0.011, 90),
             # x1/2 + 2*x2: exact .5 ties, which XNNPACK rounds up and the reference away from zero
             (s1, 0, 4.0, 2 * s1, 0)]
    for case in cases:
        _rewrite_as_channel_swap(path, conv, add, *case)
        out, ours, ref = _check(path, None, ("CONV_2D", "ADD"), "add", xq=xq)
        np.testing.assert_array_equal(ours, out)
        mid = run_numpy(path, xq, integer_xnnpack)[conv["outputs"][0]]
        np.testing.assert_array_equal(mid, xq[..., ::-1])  # the conv really is a channel swap
    assert np.sum(ref != out) > 1000  # the tie case


@pytest.mark.parametrize("case", [(0.5, 0, 1.0, 0.5 / 300, 17), (0.01, -5, 3.0, 0.01 / 2000, -40),
                                  (0.8, -128, 1.0, 0.8 / 400, 127), (0.02, 100, 0.5, 0.02 * 1200, -100)])
def test_add_outside_xnnpack_scale_range_equals_the_builtin_kernel(add_file, case):
    """An input/output scale ratio outside XNNPACK's [1/1024, 256) leaves the ADD to the builtin optimized
    kernel, whose 16-lane loop rounds and narrows differently from the reference kernel (it returns 127
    where the exact sum is far below -128): ``add_builtin`` matches it on every (x1, x2) pair."""
    path, conv, add = add_file
    _rewrite_as_channel_swap(path, conv, add, *case)
    m = TFLiteModel(path, "xnnpack")
    m.interpreter.allocate_tensors()
    assert "ADD" in [op["op_name"] for op in m.interpreter._get_ops_details()]  # not inside the delegate
    out = m.invoke_raw(_ALL_PAIRS)
    np.testing.assert_array_equal(run_numpy(path, _ALL_PAIRS, integer_xnnpack)[int(m.output["index"])], out)
    if case[3] < case[0]:  # output scale far below the inputs': the vector loop's int16 narrowing wraps
        reference = run_numpy(path, _ALL_PAIRS, _Hybrid("add"))[int(m.output["index"])]
        assert np.sum(reference != out) > 10000


@pytest.fixture(scope="module")
def add_file(tmp_path_factory):
    path, _, conv, add, _ = _add_file(tmp_path_factory.mktemp("add"))
    return path, conv, add


def test_builtin_add_runs_the_reference_arithmetic_on_the_last_elements(tmp_path):
    """A flat size that is not a multiple of 16 (5x5x2 per image, 7 images: 350 = 21*16 + 14): the last 14
    elements take the scalar loop (the reference formula), the others the vector loop."""
    path, _, conv, add, _ = _add_file(tmp_path, shape=(5, 5, 2))
    _rewrite_as_channel_swap(path, conv, add, 0.5, 0, 1.0, 0.5 / 300, 17)
    xq = np.random.default_rng(0).integers(-128, 128, (7, 5, 5, 2)).astype(np.int8)
    m = TFLiteModel(path, "xnnpack")
    out = m.invoke_raw(xq)
    ours = run_numpy(path, xq, integer_xnnpack)[int(m.output["index"])]
    np.testing.assert_array_equal(ours, out)
    mid = run_numpy(path, xq, integer_xnnpack)[conv["outputs"][0]]
    (s1, z1), (s2, z2), so = (0.5, 0), (0.5, 0), 0.5 / 300
    vector = integer_xnnpack._builtin_add_vector(xq, mid, s1, z1, np.float32(0.5) * np.float32(1.0), z2, so, 17,
                                                 (-128, 127)).reshape(-1)
    assert np.any(vector[-14:] != out.reshape(-1)[-14:]) and np.array_equal(vector[:-14], out.reshape(-1)[:-14])


def test_mean_equals_xnnpack(tmp_path):
    keras.utils.set_random_seed(4)
    x = np.random.default_rng(4).uniform(-1, 1, (64, 5, 7, 6)).astype(np.float32)
    inp = keras.Input((5, 7, 6))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    path = _export(tmp_path, keras.Model(inp, L.GlobalAveragePooling2D(name="pool")(y)), x, 4,
                   target=np.zeros((64, 16)) + 0.5)
    graph, tensors, _ = read_graph(path)
    mean = graph[-1]
    assert _q(tensors[mean["inputs"][0]])[0] != _q(tensors[mean["outputs"][0]])[0]  # needs requantization
    out, ours, ref = _check(path, x, ("CONV_2D", "MEAN"), "mean_hw")
    _assert_exact_and_distinct(out, ours, ref)


def test_mean_of_every_sum_equals_xnnpack(tmp_path):
    """GlobalAveragePooling2D on the model input: int8 inputs with every possible sum over the
    5x7 window, for the trained scales and for rewritten ones; the last scale set is one where
    fl(fl(sum * m) + b) and a fused multiply-add fma(sum, m, b) round differently (no FMA here)."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).uniform(-1, 1, (64, 5, 7, 1)).astype(np.float32)
    inp = keras.Input((5, 7, 1))
    path = _export(tmp_path, keras.Model(inp, L.GlobalAveragePooling2D()(inp)), x, 0, target=np.zeros((64, 1)))
    graph, tensors, _ = read_graph(path)
    i_in, i_out = graph[-1]["inputs"][0], graph[-1]["outputs"][0]
    count = 35
    totals = np.arange(-128 * count, 127 * count + 1)
    base = totals // count
    xq = base[:, None] + (np.arange(count)[None, :] < (totals - base * count)[:, None])
    xq = xq.reshape(-1, 5, 7, 1).astype(np.int8)
    assert (xq.astype(np.int64).sum(axis=(1, 2, 3)) == totals).all()
    (si, zi), (so, zo) = _q(tensors[i_in]), _q(tensors[i_out])
    for s_in, z_in, s_out, z_out in [(si, zi, so, zo), (0.0123, -7, 0.031, 100), (0.029575212, -90, 0.012844099, -70)]:
        rewrite(path, quantization={i_in: ([s_in], [z_in]), i_out: ([s_out], [z_out])})
        out, ours, ref = _check(path, None, ("MEAN",), "mean_hw", xq=xq)
        _assert_exact_and_distinct(out, ours, ref)
    m, b = integer_xnnpack.mean_params(count, s_in, z_in, s_out, z_out)
    fused = np.clip(np.rint(np.float32(totals * np.float64(m) + np.float64(b))), -128, 127)
    assert np.sum(fused != out[:, 0]) > 0


def test_fully_connected_after_pooling_equals_xnnpack(tmp_path):
    keras.utils.set_random_seed(5)
    x = np.random.default_rng(5).uniform(-1, 1, (1024, 4, 4, 3)).astype(np.float32)
    inp = keras.Input((4, 4, 3))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(32, 3, padding="same", use_bias=False)(inp)))
    y = L.Dense(64)(L.GlobalAveragePooling2D()(y))
    path = _export(tmp_path, keras.Model(inp, y), x, 5)
    out, ours, ref = _check(path, x, ("CONV_2D", "MEAN", "FULLY_CONNECTED"), "fully_connected")
    np.testing.assert_array_equal(ours, out)
    # One float32 rounding (XNNPACK) and the reference's double-precision multiply differ only at
    # near-ties (~1 in 50000 here), so the output scale is rewritten to make the requantization
    # scale fl(si*sw)/so exactly 2^-7: 1 in 128 values are exact ties, which XNNPACK rounds to even.
    graph, tensors, _ = read_graph(path)
    fc = graph[-1]
    si, sw = (_q(tensors[i])[0] for i in fc["inputs"][:2])
    rewrite(path, quantization={fc["outputs"][0]: ([np.float32(si * sw) * 128], [_q(tensors[fc["outputs"][0]])[1]])})
    out, ours, ref = _check(path, x, ("CONV_2D", "MEAN", "FULLY_CONNECTED"), "fully_connected")
    _assert_exact_and_distinct(out, ours, ref)


def test_softmax_is_not_delegated_and_runs_the_builtin_lut_kernel(tmp_path):
    keras.utils.set_random_seed(6)
    x = np.random.default_rng(6).uniform(-1, 1, (1024, 4, 4, 3)).astype(np.float32)
    inp = keras.Input((4, 4, 3))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    y = L.Activation("softmax")(L.Dense(10)(L.GlobalAveragePooling2D()(y)))
    path = _export(tmp_path, keras.Model(inp, y), x, 6, target=np.eye(10)[np.arange(1024) % 10])
    m = TFLiteModel(path, "xnnpack")
    m.interpreter.allocate_tensors()  # the delegate is applied here
    ops = m.interpreter._get_ops_details()
    delegate = [op for op in ops if op["op_name"] == "DELEGATE"]
    softmax = next(op for op in ops if op["op_name"] == "SOFTMAX")
    # one XNNPACK partition, ending at the SOFTMAX input: everything but the int8 SOFTMAX is delegated
    assert len(delegate) == 1 and list(delegate[0]["outputs"]) == list(softmax["inputs"])
    out, ours, ref = _check(path, x, ("CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"), "softmax")
    np.testing.assert_array_equal(ours, out)
    # The reference kernel (gemmlowp fixed-point exp) and the float table differ on ~3 in 10^5
    # values: a SOFTMAX on the model input, fed 655360 random int8 logits at input scale 0.07.
    keras.utils.set_random_seed(7)
    inp = keras.Input((10,))
    path = _export(tmp_path, keras.Model(inp, L.Activation("softmax")(inp)), x[:64, 0, 0, :1].repeat(10, 1), 7,
                   name="softmax.tflite", target=np.full((64, 10), 0.1))
    graph, _, _ = read_graph(path)
    rewrite(path, quantization={graph[0]["inputs"][0]: ([0.07], [0])})
    xq = np.random.default_rng(7).integers(-128, 128, (65536, 10)).astype(np.int8)
    out, ours, ref = _check(path, None, ("SOFTMAX",), "softmax", xq=xq)
    _assert_exact_and_distinct(out, ours, ref)
