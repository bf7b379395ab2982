"""Elementwise ops and joins (mobileqat.ops.elementwise) through ``lower``: MUL, SUB, ADD (broadcast,
three inputs), CONCATENATION (2, 3, 4 inputs of other scales), MAXIMUM, MINIMUM and the converter's
requantize (QUANTIZE int8 -> int8), against the interpreter at 0 LSB on the reference kernels and on
XNNPACK, from one trained QAT model (one conversion for the whole file).

Where the two runtimes' arithmetic differs, a test applies the other runtime's kernel to one op kind
and shows the output then differs from the interpreter: the exact match cannot happen by accident.
ADD and SUB differ only at exact rounding ties, which trained scales almost never produce: there, a
copy of the file (and the twin, the same way) gets scales that make half of the values ties.
"""
import dataclasses
import shutil

import numpy as np
import pytest

from mobileqat import debug, export, lowering, provenance, transforms
from mobileqat._tf import keras
from mobileqat.ops import KERNELS
from mobileqat.quantize import audit, quantize
from mobileqat.runtime import TFLiteModel
from test_integer_xnnpack import read_graph, rewrite

L = keras.layers


def joins_net(shape=(8, 8, 3)):
    """Every elementwise op and join, fed from branches with different ranges: MUL same-shape and
    broadcast (a squeeze-excite gate (N,1,1,C)), SUB and ADD broadcast with the gate first and second,
    ADD and MUL of three inputs, MAXIMUM/MINIMUM, CONCATENATION of 2, 3 and 4 inputs whose producers are
    single-use convs (the converter writes them at the join's scale), a conv behind Dropout, the model
    input, multi-use tensors and other joins (requantized). ADD/SUB on the model input (add_in, sub_in)
    are where the tie test rewrites scales."""
    def conv(x, name, k=1):
        return L.BatchNormalization(name=f"{name}_bn")(L.Conv2D(3, k, padding="same", use_bias=False, name=name)(x))
    inp = keras.Input(shape)
    a = L.ReLU(6.0, name="a_relu")(conv(inp, "a"))
    b = conv(inp, "b")
    c = conv(inp, "c", 3)
    gate = L.Reshape((1, 1, 3), name="gate")(L.Dense(3, name="g")(L.GlobalAveragePooling2D(name="gap")(a)))
    add_in = L.Add(name="add_in")([inp, inp])
    sub_in = L.Subtract(name="sub_in")([add_in, inp])
    mul = L.Multiply(name="mul")([a, sub_in])
    se = L.Multiply(name="se")([gate, c])  # (N,1,1,C) * (N,H,W,C)
    sub = L.Subtract(name="sub")([mul, se])
    add_b = L.Add(name="add_b")([sub, gate])
    sub_b = L.Subtract(name="sub_b")([gate, add_b])
    add3 = L.Add(name="add3")([sub_b, b, c])
    mx = L.Maximum(name="max")([add3, conv(inp, "d")])
    mn = L.Minimum(name="min")([mx, b])
    cat2 = L.Concatenate(name="cat2")([a, c])
    f = L.Dropout(0.1, name="drop")(conv(inp, "f"))
    cat3 = L.Concatenate(name="cat3")([conv(cat2, "e"), inp, f])
    mul3 = L.Multiply(name="mul3")([a, c, b])
    out = L.Concatenate(name="cat4")([mn, conv(cat3, "h"), b, mul3])
    return keras.Model(inp, out, name="joins_net")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (48, 8, 8, 3)).astype(np.float32)
    qat = quantize(joins_net())
    qat.compile("adam", "mse")
    qat.fit(x, np.asarray(qat(x)) * 1.1, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path_factory.mktemp("elementwise") / "joins.tflite")
    export.export_tflite(qat, path)
    # codes from images, then random codes over the whole int8 range (negatives, clamps downstream)
    codes = np.concatenate([TFLiteModel(path, "reference").quantize_input(x),
                            rng.integers(-128, 128, (208, 8, 8, 3)).astype(np.int8)])
    outputs = {rt: TFLiteModel(path, rt).invoke_raw(codes) for rt in ("reference", "xnnpack")}
    return qat, path, codes, outputs


def _file_ops(path):
    graph, tensors, _ = read_graph(path)
    return graph, tensors


def test_the_converter_writes_one_int8_op_per_pair_and_requantizes_join_inputs(exported):
    qat, path, _, _ = exported
    twin = lowering.lower(qat)
    graph, tensors = _file_ops(path)
    names = [op["name"] for op in graph]
    counts = {n: names.count(n) for n in set(names)}
    assert {k: counts.get(k, 0) for k in ("ADD", "SUB", "MUL", "CONCATENATION", "MAXIMUM", "MINIMUM")} == \
        {"ADD": 4, "SUB": 3, "MUL": 4, "CONCATENATION": 3, "MAXIMUM": 1, "MINIMUM": 1}  # add3, mul3: two ops each
    assert all(tensors[o]["dtype"] == np.int8 for op in graph for o in op["outputs"]
               if op["name"] not in ("SHAPE", "STRIDED_SLICE", "PACK"))
    # every join input has the join's scale: a QUANTIZE before it, or its producer writes that scale
    requantize = [op for op in graph if op["name"] == "QUANTIZE"]
    assert len(requantize) == sum(op.kind == "requantize" for op in twin.ops) == 7
    for op in graph:
        if op["name"] in ("CONCATENATION", "MAXIMUM", "MINIMUM"):
            assert len({tensors[i]["quantization"] for i in op["inputs"] + op["outputs"]}) == 1
    # single-use free-scale producers take the join's scale (converter: FoldTrivalRequantizeOp), also
    # through Dropout; the model input, multi-use tensors and joins feeding joins are requantized
    cat3, cat4 = twin.tensors["quant_cat3"], twin.tensors["quant_cat4"]
    for name, join in (("quant_e", cat3), ("quant_f", cat3), ("quant_drop", cat3), ("quant_h", cat4),
                       ("quant_mul3", cat4), ("quant_add3", twin.tensors["quant_max"])):
        assert (twin.tensors[name].scale, twin.tensors[name].zero_point) == (join.scale, join.zero_point), name
    requantized = sorted(op.inputs[0] for op in twin.ops if op.kind == "requantize")
    assert requantized == sorted(["quant_a", "quant_b", "quant_b", "quant_c", "quant_max", "quant_min",
                                  twin.input.name])  # the model input (tfmot numbers its QuantizeLayer per session)


def test_twin_holds_the_files_graph_in_another_op_order(exported):
    qat, path, _, _ = exported
    twin = lowering.lower(qat)
    assert provenance.first_difference(twin, path) is None
    graph, tensors = _file_ops(path)
    file_order = [op["name"] for op in graph if op["name"] in lowering.TFLITE_OPS.values()
                  and tensors[op["outputs"][0]]["dtype"] == np.int8]  # not the int32 shape arithmetic
    twin_order = [lowering.TFLITE_OPS[op.kind] for op in twin.ops if op.kind in lowering.TFLITE_OPS]
    assert sorted(file_order) == sorted(twin_order) and file_order != twin_order  # branches in another order
    q = twin.tensors["quant_max"]  # a join's scale off by one float32 step is named
    twin.tensors["quant_max"] = dataclasses.replace(q, scale=np.nextafter(q.scale, np.float32(1)))
    assert "layer 'quant_max'" in provenance.first_difference(twin, path)


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_integer_path_equals_the_runtime(exported, runtime):
    qat, _, codes, outputs = exported
    twin = lowering.lower(qat)
    np.testing.assert_array_equal(twin.run(codes, runtime), outputs[runtime])
    values = twin.run(codes, runtime, keep_all=True)
    clamped = {op.kind for op in twin.ops if op.kind in ("add", "sub", "mul", "requantize")
               and (values[op.output] == -128).any() and (values[op.output] == 127).any()}
    assert len(clamped) >= 2, clamped  # inputs that reach both ends of int8


def test_the_runtimes_differ_on_this_model(exported):
    _, _, _, outputs = exported
    assert np.sum(outputs["reference"] != outputs["xnnpack"]) > 1000


@pytest.mark.parametrize("kind", ["mul", "requantize"])
@pytest.mark.parametrize("runtime,other", [("xnnpack", "reference"), ("reference", "xnnpack")])
def test_the_other_runtimes_arithmetic_misses(exported, monkeypatch, kind, runtime, other):
    """MUL (fixed point vs float32) and requantize (Q31 vs Q8 multiplier) tell the runtimes apart on
    trained scales: the other runtime's kernel for that one op kind no longer matches."""
    qat, _, codes, outputs = exported
    monkeypatch.setitem(KERNELS[kind], runtime, KERNELS[kind][other])
    assert np.sum(lowering.lower(qat).run(codes, runtime) != outputs[runtime]) > 0


def _rewritten(qat, path, tmp_path, changes):
    """A copy of the file and a twin with the same tensors re-quantized: changes {twin op output name:
    (scale, zero point)}. The file op is the one of the same TFLite op with the twin tensor's scale and
    zero point (unique here); ``first_difference`` then checks that both sides hold the same graph."""
    twin = lowering.lower(qat)
    graph, tensors = _file_ops(path)
    new = str(tmp_path / "rewritten.tflite")
    shutil.copy(path, new)
    quantization = {}
    for name, (scale, zero) in changes.items():
        op, q = next(o for o in twin.ops if o.output == name), twin.tensors[name]
        found = [g["outputs"][0] for g in graph if g["name"] == lowering.TFLITE_OPS[op.kind]
                 and tensors[g["outputs"][0]]["quantization"] == (float(q.scale), q.zero_point)]
        assert len(found) == 1, name
        quantization[found[0]] = ([scale], [zero])
        twin.tensors[name] = lowering.QTensor(name, np.float32(scale), zero)
    rewrite(new, quantization=quantization)
    assert provenance.first_difference(twin, new) is None  # the same rewrite on both sides
    return twin, new


def test_add_and_sub_ties_tell_the_runtimes_apart(exported, tmp_path, monkeypatch):
    """ADD(x, x) at output scale 4*s: y = x/2, a tie for every odd code; SUB(add_in, x) at output scale
    2*s with add_in at 4*s: y = 2*add_in - x/2. Reference kernels round ties away from zero, XNNPACK
    up (floor(v + 1/2)): every negative tie differs, and the twin follows each runtime."""
    qat, path, codes, _ = exported
    s = lowering.lower(qat).input.scale
    twin, new = _rewritten(qat, path, tmp_path, {"quant_add_in": (4 * s, 0), "quant_sub_in": (2 * s, 0)})
    for runtime, other in (("reference", "xnnpack"), ("xnnpack", "reference")):
        out = TFLiteModel(new, runtime).invoke_raw(codes)
        np.testing.assert_array_equal(twin.run(codes, runtime), out)
        for kind in ("add", "sub"):
            with monkeypatch.context() as m:
                m.setitem(KERNELS[kind], runtime, KERNELS[kind][other])
                assert np.sum(twin.run(codes, runtime) != out) > 0, (kind, runtime)


def _not_delegated(path, codes):
    """(names of the ops XNNPACK left to the builtin kernels, the output) after a run on the default path:
    an op inside a delegate partition has no buffer for its output, one at a partition's edge writes
    a DELEGATE node's output; the others ran on their own."""
    m = TFLiteModel(path, "xnnpack")
    out = m.invoke_raw(codes)
    it = m.interpreter
    ops = it._get_ops_details()
    edges = {int(o) for op in ops if op["op_name"] == "DELEGATE" for o in op["outputs"]}
    left = []
    for op in ops:
        out_index = int(op["outputs"][0])
        if op["op_name"] == "DELEGATE" or out_index in edges:
            continue
        try:
            value = it.get_tensor(out_index)
        except ValueError:  # no buffer: computed inside a partition
            continue
        if value.dtype == np.int8:  # not the int32 shape arithmetic of a Reshape
            left.append(op["op_name"])
    return left, out


def test_ops_xnnpack_refuses_run_the_builtin_arithmetic(exported, tmp_path):
    """Scales the delegate refuses (SUB input/output ratios below 1/1024 (sub_in) and, downstream of the
    rewritten MUL, above 256 (sub); MUL product/output ratio below 2^-16; requantize ratios below 1/256
    and above 128): those ops stay on the builtin kernels, whose x86 arithmetic is the reference one,
    and the twin's "xnnpack" path follows."""
    qat, path, codes, _ = exported
    twin = lowering.lower(qat)
    s_in, s_a, s_b, s_max, s_min, s_cat4 = (twin.tensors[n].scale for n in (
        twin.input.name, "quant_a", "quant_b", "quant_max", "quant_min", "quant_cat4"))
    del s_min
    big = max(s_max, s_b, s_cat4) * 300  # MINIMUM and its requantized inputs: from quant_max, quant_b; into cat4
    assert max(s_max, s_b) / big < 1 / 256 and big / s_cat4 > 128
    changes = {"quant_sub_in": (s_in * 1500, 0), "quant_mul": (s_a * s_in * 1500 * 2 ** 17, 0), "quant_min": (big, 0)}
    twin, new = _rewritten(qat, path, tmp_path, changes)
    graph, _ = _file_ops(new)
    rewrite(new, quantization={i: ([big], [0]) for i in next(op for op in graph if op["name"] == "MINIMUM")["inputs"]})
    for name in next(op for op in twin.ops if op.kind == "minimum").inputs:
        twin.tensors[name] = lowering.QTensor(name, np.float32(big), 0)
    # int8 MAXIMUM/MINIMUM: the delegate takes float only (the RESHAPE has a constant shape: delegated)
    assert sorted(_not_delegated(path, codes)[0]) == ["MAXIMUM", "MINIMUM"]
    left, out = _not_delegated(new, codes)
    assert sorted(left) == ["MAXIMUM", "MINIMUM", "MUL", "QUANTIZE", "QUANTIZE", "QUANTIZE", "SUB", "SUB"]
    np.testing.assert_array_equal(twin.run(codes, "xnnpack"), out)
    np.testing.assert_array_equal(twin.run(codes, "reference"), TFLiteModel(new, "reference").invoke_raw(codes))


def test_debugger_shows_joins_at_zero_lsb(exported):
    """The converter names a requantized copy after its producer: the debugger keeps the producer's own
    tensor, so every row of the integer path is exact."""
    qat, path, codes, _ = exported
    x = np.random.default_rng(4).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    result = debug.debug_fidelity(qat, path, x, compare_runtime=None)
    assert result["integer_path_error"] is None and result["first_integer_divergence"] is None
    rows = {row["layer"]: row for row in result["layers"]}
    assert all(rows[n]["integer_max_lsb_diff"] == 0 for n in ("a", "b", "c", "mul", "cat2", "max", "min", "cat4"))


def test_split_merges_keeps_the_function():
    keras.utils.set_random_seed(2)
    inp = keras.Input((4, 4, 2))
    a, b = L.Conv2D(2, 1, name="a")(inp), L.Conv2D(2, 1, name="b")(inp)
    y = L.Add(name="add")([inp, a, b])
    y = L.Maximum(name="max")([y, a, b, inp])
    model = keras.Model(inp, L.Multiply(name="mul")([y, L.Minimum(name="min")([a, b]), a]))
    split = transforms.split_merges(model)
    names = [layer.name for layer in split.layers]
    assert {"add_1", "add", "max_1", "max_2", "max", "mul_1", "mul", "min"} <= set(names)
    assert all(len(layer.input) == 2 for layer in split.layers if isinstance(layer, L.Add))
    x = np.random.default_rng(2).normal(size=(3, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(split.predict(x, verbose=0), model.predict(x, verbose=0))
    assert transforms.split_merges(split) is split  # nothing left to split


def test_average_is_refused_with_the_fix():
    inp = keras.Input((4, 4, 2))
    model = keras.Model(inp, L.Average(name="avg")([inp, L.Conv2D(2, 1)(inp)]))
    problems = audit(model)
    assert [(p.name, p.cls) for p in problems] == [("avg", "Average")]
    assert "use Add" in problems[0].fix


# --- a join's scale carried back through pass-through layers (DenseNet) --------------------------------

def dense_chains_net(shape=(16, 16, 3)):
    """DenseNet's joins: a Concatenate whose input comes from pass-through layers (no range of their own)
    gives that chain its scale back to the first layer reading a tensor with a range; that layer runs at
    its input's scale and a QUANTIZE follows it, read by every user (the BatchNormalization beside the
    join too): pad -> pool (the stem of DenseNet121), avg (a transition), and m (through Dropout, its
    output also cropped: Cropping2D then runs at the join's scale)."""
    def conv(x, name, filters=4, k=1, relu=False):
        x = L.BatchNormalization(name=f"{name}_bn")(L.Conv2D(filters, k, padding="same", use_bias=False, name=name)(x))
        return L.ReLU(name=f"{name}_relu")(x) if relu else x

    def bn_relu_conv(x, name):  # DenseNet's conv block: BN -> ReLU -> conv (the BN cannot fold: standalone)
        return conv(L.ReLU(name=f"{name}_pre_relu")(L.BatchNormalization(name=f"{name}_pre_bn")(x)), name, 4, 3)

    inp = keras.Input(shape)
    stem = conv(inp, "stem", 6, 3, relu=True)
    pool = L.MaxPooling2D(3, strides=2, name="pool")(L.ZeroPadding2D(1, name="pad")(stem))      # 8x8x6
    cat0 = L.Concatenate(name="cat0")([pool, bn_relu_conv(pool, "c0")])                          # 8x8x10
    avg = L.AveragePooling2D(2, name="avg")(conv(cat0, "t", 6))                                  # 4x4x6
    cat1 = L.Concatenate(name="cat1")([avg, bn_relu_conv(avg, "c1")])                            # 4x4x10
    m = L.MaxPooling2D(2, strides=1, padding="same", name="m")(cat1)
    cat2 = L.Concatenate(name="cat2")([L.Dropout(0.1, name="drop")(m), conv(cat1, "c2")])
    crop = conv(L.Cropping2D(1, name="crop")(m), "c3")                                           # 2x2x4
    gaps = [L.GlobalAveragePooling2D(name=f"gap{i}")(t) for i, t in enumerate((cat2, crop))]
    return keras.Model(inp, L.Dense(6, name="fc")(L.Concatenate(name="cat_gap")(gaps)), name="dense_chains")


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (48, 16, 16, 3)).astype(np.float32)
    qat = quantize(dense_chains_net())
    qat.compile("adam", "mse")
    qat.fit(x, np.asarray(qat(x)) * 1.1, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path_factory.mktemp("chains") / "chains.tflite")
    export.export_tflite(qat, path)
    codes = np.concatenate([TFLiteModel(path, "reference").quantize_input(x),
                            rng.integers(-128, 128, (80, 16, 16, 3)).astype(np.int8)])
    outputs = {rt: TFLiteModel(path, rt).invoke_raw(codes) for rt in ("reference", "xnnpack")}
    return qat, path, codes, outputs


def test_a_joins_scale_flows_back_through_pass_through_layers(chains):
    """The file: PAD, AVERAGE_POOL_2D and m's MAX_POOL_2D run at their input's scale, a QUANTIZE to the
    join's scale follows, and the join and the standalone BatchNormalization (DEPTHWISE_CONV_2D) both
    read it; the twin holds the same graph (``provenance.first_difference``)."""
    qat, path, _, _ = chains
    twin = lowering.lower(qat)
    graph, tensors = _file_ops(path)
    producer = {o: op for op in graph for o in op["outputs"]}
    q = {i: tensors[i]["quantization"] for i in tensors}
    heads = {}
    for op in graph:
        if op["name"] == "QUANTIZE" and producer.get(op["inputs"][0], {}).get("name") in ("PAD", "AVERAGE_POOL_2D",
                                                                                          "MAX_POOL_2D"):
            head = producer[op["inputs"][0]]
            assert q[head["outputs"][0]] == q[head["inputs"][0]]  # computed at its input's scale
            users = sorted(u["name"] for u in graph if op["outputs"][0] in u["inputs"])
            heads[head["name"]] = users
            assert not any(op["inputs"][0] in u["inputs"] for u in graph if u is not op)  # only the QUANTIZE reads it
    assert heads == {"PAD": ["MAX_POOL_2D"], "AVERAGE_POOL_2D": ["CONCATENATION", "DEPTHWISE_CONV_2D"],
                     "MAX_POOL_2D": ["CONCATENATION", "STRIDED_SLICE"]}, heads
    requantized = {op.inputs[0]: op.output for op in twin.ops if op.kind == "requantize"}
    for name, join in (("quant_pad", "quant_cat0"), ("quant_avg", "quant_cat1"), ("quant_m", "quant_cat2")):
        assert requantized[f"{name}/unrequantized"] == name
        assert (twin.tensors[name].scale, twin.tensors[name].zero_point) == \
            (twin.tensors[join].scale, twin.tensors[join].zero_point), name
    assert twin.tensors["quant_crop"].scale == twin.tensors["quant_cat2"].scale
    assert provenance.first_difference(twin, path) is None


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_join_chains_equal_the_runtime(chains, runtime, monkeypatch):
    """0 LSB on each runtime; with the join's scale not carried back (each join requantizing its own
    input, as before DenseNet121 was measured), the twin's output misses."""
    qat, path, codes, outputs = chains
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), outputs[runtime])
    monkeypatch.setattr(lowering, "_join_scale_heads", lambda model, inbound: {})
    old = lowering.lower(qat)
    assert provenance.first_difference(old, path) is not None
    assert np.sum(old.run(codes, runtime) != outputs[runtime]) > 0
