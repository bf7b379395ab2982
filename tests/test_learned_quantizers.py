"""Learned quantizers (LSQ, LSQ+ offset, PACT): their gradients against the papers' closed forms in numpy,
initialisation from the data, serialization, schemes that choose them, and a tiny model that trains with them,
exports full int8 with the learned scales in the file and lowers at 0 LSB on the reference kernels and XNNPACK."""
import json

import numpy as np
import pytest
from conftest import numpy_fake_quant

from mobileqat import debug, export, lowering, provenance
from mobileqat._tf import keras, tf
from mobileqat.quantize import load_qat_model, quantize, scheme_plan
from mobileqat.quantizers import (ActivationQuantizer, LSQActivationQuantizer, LSQWeightQuantizer, PACTQuantizer,
                                  WeightQuantizer)
from mobileqat.runtime import TFLiteModel
from mobileqat.schemes import QuantScheme, as_scheme_or_rules, get_scheme

L = keras.layers


def _grads(quantizer, x, dy, training=True, qvars=None):
    """(y, dL/dx, {var name: dL/dvar}) for L = sum(dy * quantizer(x)); builds the variables unless given."""
    layer = keras.layers.Layer()
    qvars = qvars or quantizer.build(x.shape, "t", layer)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = quantizer(xt, training, qvars)
        loss = tf.reduce_sum(y * dy)
    trainable = {k: v for k, v in vars(qvars).items() if v.trainable}
    gx, gvars = tape.gradient(loss, [xt, list(trainable.values())])
    return y.numpy(), gx.numpy(), dict(zip(trainable, [g.numpy() for g in gvars])), qvars


# --- LSQ weights -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,per_channel", [(4, True), (8, False), (3, True)])
def test_lsq_weight_forward_init_and_gradients_match_the_paper(rng, bits, per_channel):
    w = (rng.normal(size=(3, 3, 4, 5)) * np.array([0.1, 1, 3, 0.01, 7])).astype(np.float32)
    dy = rng.normal(size=w.shape).astype(np.float32)
    q = LSQWeightQuantizer(bits, per_channel=per_channel, init="paper")
    y, gw, g, qvars = _grads(q, w, dy)
    qp = 2 ** (bits - 1) - 1
    axes = (0, 1, 2) if per_channel else None
    # initialised from the weights: s = 2 mean|w| / sqrt(Qp)
    init = np.float32(qvars.step.numpy())
    np.testing.assert_allclose(init, 2 * np.abs(w).mean(axis=axes) / np.sqrt(qp), rtol=1e-6)
    assert qvars.initialized.numpy() == 1.0
    # a smaller learned step (part of every channel clipped): training keeps it (initialisation happens once)
    shrink = np.float32(0.4 if bits < 8 else 0.1)
    qvars.step.assign(init * shrink)
    y, gw, g, _ = _grads(q, w, dy, qvars=qvars)
    s = np.float32(qvars.step.numpy())
    np.testing.assert_array_equal(s, init * shrink)
    # forward: TF's FakeQuant arithmetic (numpy) on [-127 s, 127 s] after a clip to [-Qp s, Qp s]: codes on the
    # b-bit grid, step = the file's scale
    top = s * np.float32(127)
    expected = numpy_fake_quant(np.clip(w, -s * np.float32(qp), s * np.float32(qp)), -top, top, 8, True)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6 * np.abs(w).max())
    step = q.steps(qvars)
    codes = y / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(np.round(codes)).max() == qp
    assert np.all(np.abs(step.view(np.int32) - np.atleast_1d(s).view(np.int32)) <= 1)  # the file's step vs s
    # gradients (Esser et al. 2020, eq. 3 + gradient scale): STE for w inside the range, s: round(u) - u inside,
    # -Qp / +Qp at the clip, times g = 1 / sqrt(N Qp)
    u = w.astype(np.float64) / s
    inside = np.abs(u) <= qp
    np.testing.assert_array_equal(gw, np.where(inside, dy, 0))
    rounded = np.asarray(expected, np.float64) / s  # round(u) with FakeQuant's rounding
    n = w.size // (w.shape[-1] if per_channel else 1)
    closed = np.sum(dy * np.where(inside, rounded - u, np.sign(u) * qp), axis=axes) / np.sqrt(n * qp)
    np.testing.assert_allclose(g["step"], closed, rtol=1e-4, atol=1e-6)
    assert np.all((~inside).sum(axis=axes) > 0)  # the clip branch is exercised (in every channel)


def test_lsq_weight_gradient_at_the_clip_matches_finite_differences(rng):
    """Outside the range the output is exactly +-Qp s, so d/ds there is the true derivative: compare with a
    central difference of L = sum(dy * w_q) over weights far outside the range."""
    q = LSQWeightQuantizer(4, per_channel=False)
    w = np.concatenate([rng.uniform(5, 9, 20), -rng.uniform(5, 9, 20)]).astype(np.float32)
    dy = rng.normal(size=w.shape).astype(np.float32)
    _, _, g, qvars = _grads(q, w, dy)
    qvars.step.assign(0.25)
    _, _, g, _ = _grads(q, w, dy, qvars=qvars)
    eps = 1e-3

    def loss(s):
        qvars.step.assign(s)
        return float(np.sum(dy.astype(np.float64) * q(tf.constant(w), False, qvars).numpy()))
    fd = (loss(0.25 + eps) - loss(0.25 - eps)) / (2 * eps)
    assert g["step"] == pytest.approx(fd / np.sqrt(w.size * 7), rel=1e-3)


def test_packed_int4_lsq_uses_a_4_bit_fake_quant(rng):
    w = rng.normal(size=(8, 6)).astype(np.float32)
    q = LSQWeightQuantizer(4, per_channel=False, packed_int4=True)
    y, _, _, qvars = _grads(q, w, np.ones_like(w))
    s = np.float32(qvars.step.numpy())
    top = s * np.float32(7)
    np.testing.assert_allclose(y, numpy_fake_quant(w, -top, top, 4, True), atol=1e-6)
    assert q.fake_quant_bits() == 4 and q.steps(qvars) == top / np.float32(7)
    with pytest.raises(ValueError, match="packed INT4"):
        LSQWeightQuantizer(8, packed_int4=True)


# --- LSQ+ activations ---------------------------------------------------------------------------------------

def test_lsq_activation_init_forward_and_gradients(rng):
    x = rng.normal(size=(4, 5, 5, 3)).astype(np.float32) * 2
    dy = rng.normal(size=x.shape).astype(np.float32)
    q = LSQActivationQuantizer(8)
    _, _, _, qvars = _grads(q, x, dy)
    # initialised from the first batch: beta = min, s = (max - min) / 255
    assert qvars.offset.numpy() == pytest.approx(x.min())
    assert qvars.step.numpy() == pytest.approx((x.max() - x.min()) / 255, rel=1e-6)
    # narrower learned range: part of the batch falls outside
    qvars.step.assign(0.01)
    qvars.offset.assign(-1.0)
    y, gx, g, _ = _grads(q, x, dy, qvars=qvars)
    s, beta = np.float32(0.01), np.float32(-1.0)
    lo, hi = q.fake_quant_range(qvars)
    assert (lo, hi) == (beta, beta + s * np.float32(255))
    expected = numpy_fake_quant(x, lo, hi, 8)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    u = (x.astype(np.float64) - beta) / s
    below, above = u < 0, u > 255
    inside = ~(below | above)
    assert below.any() and above.any() and inside.any()
    np.testing.assert_array_equal(gx, np.where(inside, dy, 0))
    gscale = 1 / np.sqrt(x[0].size * 255)
    ds = gscale * np.sum(dy * np.where(inside, (expected - x) / s, np.where(above, 255, 0)))
    dbeta = gscale * np.sum(np.where(inside, 0, dy))
    assert g["step"] == pytest.approx(ds, rel=1e-4)
    assert g["offset"] == pytest.approx(dbeta, rel=1e-4)


# --- PACT ---------------------------------------------------------------------------------------------------

def test_pact_init_forward_gradients_and_l2(rng):
    x = np.maximum(rng.normal(size=(8, 16)), 0).astype(np.float32) * 3  # after a ReLU
    dy = rng.normal(size=x.shape).astype(np.float32)
    q = PACTQuantizer(8, l2=0.01)
    layer = keras.layers.Layer()
    qvars = q.build(x.shape, "t", layer)
    _grads(q, x, dy, qvars=qvars)
    assert qvars.alpha.numpy() == pytest.approx(x.max())  # initialised from the first batch
    qvars.alpha.assign(2.0)
    y, gx, g, _ = _grads(q, x, dy, qvars=qvars)
    np.testing.assert_allclose(y, numpy_fake_quant(np.clip(x, 0, 2.0), 0.0, 2.0, 8), atol=1e-6)
    # Choi et al. 2018, eq. 3: d y / d alpha = 1 where x >= alpha; d y / d x = 1 on [0, alpha)
    assert (x >= 2.0).any() and (x < 2.0).any()
    assert g["alpha"] == pytest.approx(np.sum(dy[x >= 2.0]), rel=1e-5)
    np.testing.assert_array_equal(gx, np.where((x >= 0) & (x < 2.0), dy, 0))
    # the L2 term on alpha is in the layer's losses: 0.01 * alpha^2
    assert [float(v) for v in layer.losses] == [pytest.approx(0.01 * 4.0)]
    assert q.fake_quant_range(qvars) == (0.0, np.float32(2.0))
    with pytest.raises(ValueError, match="l2"):
        PACTQuantizer(l2=-1.0)


@pytest.mark.parametrize("q", [LSQWeightQuantizer(4, per_channel=False), LSQWeightQuantizer(4, packed_int4=True),
                               LSQActivationQuantizer(8), PACTQuantizer(8), PACTQuantizer(8, l2=1e-4)])
def test_learned_quantizers_round_trip_config(q):
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q))
    assert restored == q and restored is not q


# --- schemes ------------------------------------------------------------------------------------------------

def test_schemes_choose_learned_quantizers(tmp_path):
    scheme = get_scheme({"weight_bits": 4, "weight_method": "lsq", "activation_method": "pact", "pact_l2": 1e-4})
    assert isinstance(scheme.weight_quantizer(), LSQWeightQuantizer)
    assert scheme.weight_quantizer().num_bits == 4
    assert scheme.dense_weight_quantizer().per_channel is False
    assert scheme.fully_connected_weight_quantizer(8).packed_int4 is False  # packed_int4 not asked
    assert scheme.activation_quantizer(L.ReLU(6.0)) == PACTQuantizer(8, l2=1e-4)
    assert scheme.activation_quantizer(L.Conv2D(2, 1, activation="relu")) == PACTQuantizer(8, l2=1e-4)
    # outputs that can be negative keep the moving-average range under "pact"
    assert isinstance(scheme.activation_quantizer(L.Add()), ActivationQuantizer)
    assert isinstance(scheme.activation_quantizer(L.ReLU(negative_slope=0.1)), ActivationQuantizer)
    assert isinstance(scheme.activation_quantizer(), ActivationQuantizer)
    lsq = get_scheme("w4a8_lsq")
    assert lsq.fully_connected_weight_quantizer(8) == LSQWeightQuantizer(4, per_channel=False, packed_int4=True)
    assert lsq.activation_quantizer(L.Add()) == LSQActivationQuantizer(8)
    assert isinstance(get_scheme("w4a8").weight_quantizer(), WeightQuantizer)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"default": "w4a8_lsq", "rules": [
        {"match": {"position": "first"}, "scheme": {"weight_method": "lsq", "activation_method": "pact"}}]}))
    parsed = as_scheme_or_rules(str(rules))
    assert parsed.default.weight_method == "lsq" and parsed.rules[0].scheme.activation_method == "pact"
    for bad, word in (({"weight_method": "lsqq"}, "weight_method"), ({"activation_method": "max"}, "activation_method"),
                      ({"pact_l2": -1}, "pact_l2")):
        with pytest.raises(ValueError, match=word):
            get_scheme(bad)


# --- a tiny model: train, save, export, lower ---------------------------------------------------------------

SCHEME = {"default": {"weight_bits": 4, "weight_method": "lsq", "activation_method": "pact", "packed_int4": True},
          "rules": [{"match": {"name": "proj"}, "scheme": {"weight_method": "lsq", "activation_method": "lsq"}}]}


def tiny_net():
    """16x16x3 -> 4: conv+BN+ReLU (stride 2), depthwise+BN+ReLU6, 1x1 projection+BN (signed), Add, Conv2D+ReLU
    with bias, GAP, Dense(6) on 8 features, Dense(4) on 6 (both packed INT4), softmax."""
    inp = keras.Input((16, 16, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False, name="proj")(y))
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="plain")(x)
    x = L.Dense(6, activation="relu", name="fc1")(L.GlobalAveragePooling2D()(x))
    x = L.Dense(4, name="fc")(x)
    return keras.Model(inp, L.Activation("softmax")(x), name="lsq_net")


def _learned(qat):
    """{variable name: value} of every learned step / offset / alpha."""
    return {v.name: v.numpy().copy() for v in qat.weights if any(k in v.name for k in ("_lsq_step", "_lsq_offset",
                                                                                         "_pact_alpha"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsq")
    keras.utils.set_random_seed(21)
    rng = np.random.default_rng(21)
    x = rng.uniform(-1, 1, (96, 16, 16, 3)).astype(np.float32)
    y = ((x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].std(axis=(1, 2)) > 0.577)) % 4
    model = tiny_net()
    plan = scheme_plan(model, SCHEME)
    qat = quantize(model, SCHEME)
    qat.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    qat.fit(x[:16], y[:16], epochs=1, batch_size=16, verbose=0)  # one step: the data initialisation
    before = _learned(qat)
    qat.fit(x, y, epochs=2, batch_size=16, verbose=0)
    after = _learned(qat)
    path = str(folder / "lsq_net.tflite")
    export.export_tflite(qat, path)
    qat.save(folder / "lsq_net.h5")
    return qat, path, plan, x, before, after, folder


def _quantizers(qat):
    """{layer name: (weight quantizer, its vars) or None, (output quantizer, its vars) or None}."""
    out = {}
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        wq = None
        if getattr(inner, "weight_quantizer", None) is not None and hasattr(inner, "_wq_vars"):
            wq = (inner.weight_quantizer, inner._wq_vars)
        elif getattr(layer, "_weight_vars", None):
            wq = layer._weight_vars[0][1:]
        oq = (layer._output_quantizers[0], layer._output_quantizer_vars) if getattr(
            layer, "_output_quantizers", None) else None
        out[getattr(inner, "name", layer.name)] = (wq, oq)
    return out


def test_the_model_gets_the_quantizers_the_scheme_names(trained):
    qat, _, plan, _, _, _, _ = trained
    assert plan["proj"]["scheme"]["activation_method"] == "lsq" and plan["stem"]["scheme"]["weight_bits"] == 4
    qs = _quantizers(qat)
    kinds = {name: (type(w[0]).__name__ if w else None, type(o[0]).__name__ if o else None)
             for name, (w, o) in qs.items() if w or o}
    assert kinds["stem"] == ("LSQWeightQuantizer", "PACTQuantizer")      # folded conv + BN + ReLU
    assert kinds["dw"] == ("LSQWeightQuantizer", "PACTQuantizer")        # ReLU6
    assert kinds["proj"] == ("LSQWeightQuantizer", "LSQActivationQuantizer")  # signed output, LSQ+ by rule
    assert kinds["add"] == (None, "ActivationQuantizer")                 # signed, "pact" keeps the EMA range
    assert kinds["plain"] == ("LSQWeightQuantizer", "PACTQuantizer")
    assert kinds["fc1"] == ("LSQWeightQuantizer", "PACTQuantizer") and qs["fc1"][0][0].packed_int4
    assert kinds["fc"] == ("LSQWeightQuantizer", "ActivationQuantizer") and qs["fc"][0][0].packed_int4
    assert qs["proj"][0][0].num_bits == 8 and qs["stem"][0][0].num_bits == 4


def test_steps_and_clipping_levels_train(trained):
    _, _, _, _, before, after, _ = trained
    assert len(before) == 6 + 2 + 4  # 6 weight steps, one LSQ+ step and offset, 4 PACT alphas
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved == set(before), sorted(set(before) - moved)


def test_save_and_load_h5_without_custom_objects(trained):
    qat, _, _, x, _, _, folder = trained
    loaded = load_qat_model(folder / "lsq_net.h5")
    np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), qat.predict(x[:8], verbose=0))
    assert len(loaded.weights) == len(qat.weights)
    for a, b in zip(qat.weights, loaded.weights):  # every variable (learned steps and alphas too) in its place
        assert a.name.split("/")[-1] == b.name.split("/")[-1]
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    for a, b in zip(_quantizers(qat).values(), _quantizers(loaded).values()):
        for qa, qb in zip(a, b):
            assert (qa is None) == (qb is None) and (qa is None or qa[0] == qb[0])


def test_the_file_holds_the_learned_scales_and_the_4_bit_grid(trained):
    qat, path, _, _, _, _, _ = trained
    twin = lowering.lower(qat)
    m = TFLiteModel(path, "reference")
    it = m.interpreter
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    mapped = provenance.file_tensors(twin, path)
    ops_by_output = {op["outputs"][0]: op for op in it._get_ops_details()}
    qs = _quantizers(qat)
    checked_w, checked_a = set(), set()
    for op in twin.ops:
        name = op.output[len("quant_"):] if op.output.startswith("quant_") else op.output
        if op.output not in mapped:
            continue
        file_out = tensors[mapped[op.output]]["quantization_parameters"]
        wq, oq = qs.get(name, (None, None))
        if oq is not None and hasattr(oq[0], "fake_quant_range"):  # a learned activation range
            scale, zp = lowering.quantization_params(*oq[0].fake_quant_range(oq[1]))
            assert file_out["scales"][0] == np.float32(scale) and file_out["zero_points"][0] == zp, name
            if isinstance(oq[0], PACTQuantizer):
                assert zp == -128 and file_out["scales"][0] == np.float32(np.float64(oq[1].alpha.numpy()) / 255)
            else:  # LSQ+: the step within float32 rounding
                assert file_out["scales"][0] == pytest.approx(abs(oq[1].step.numpy()), rel=1e-5)
            assert debug.keras_quant_params(qat.get_layer(op.output)) == (file_out["scales"][0], zp)  # the debugger
            checked_a.add(name)
        if wq is None or "weights" not in op.params:
            continue
        fop = ops_by_output[mapped[op.output]]
        wt = tensors[fop["inputs"][1]]
        file_scales = np.asarray(wt["quantization_parameters"]["scales"], np.float32)
        np.testing.assert_array_equal(file_scales, np.atleast_1d(wq[0].steps(wq[1])), err_msg=name)
        s = np.abs(np.atleast_1d(np.float32(wq[1].step.numpy())))
        assert np.all(np.abs(file_scales.view(np.int32) - s.view(np.int32)) <= 1), (name, file_scales, s)
        codes = it.get_tensor(wt["index"]).astype(int)
        qp = 2 ** (wq[0].num_bits - 1) - 1
        assert np.abs(codes).max() <= qp, name
        assert (wt["dtype"] == np.int8) or wq[0].packed_int4, name
        np.testing.assert_array_equal(codes, op.params["weights"], err_msg=name)
        checked_w.add(name)
    assert checked_w == {"stem", "dw", "proj", "plain", "fc1", "fc"}
    assert checked_a == {"stem", "dw", "proj", "plain", "fc1"}
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    root = flatbuffer_utils.read_model_from_bytearray(bytearray(open(path, "rb").read()))
    int4 = [t for t in root.subgraphs[0].tensors if t.type == schema.TensorType.INT4]
    assert len(int4) == 2 and all(b"quant_fc" in t.name for t in int4)  # both Dense layers: even input counts
    assert export.tensor_types(path)["float_ops"] == []


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_integer_twin_matches_the_file_at_0_lsb(trained, runtime):
    qat, path, _, x, _, _, _ = trained
    m = TFLiteModel(path, runtime)
    codes = m.quantize_input(x)
    out = np.concatenate([m.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), out)


def test_lsq_max_init_starts_on_the_min_max_grid(rng):
    """init="max" (the default): s = max|w| / Qp per channel (numpy), so no weight is clipped and the codes reach
    +-Qp; the option round-trips through the config and is a QuantScheme field (lsq_init) that reaches the
    quantizer."""
    w = (rng.normal(size=(3, 3, 4, 5)) * np.array([0.1, 1, 3, 0.01, 7])).astype(np.float32)
    q = LSQWeightQuantizer(4, per_channel=True)
    y, _, _, qvars = _grads(q, w, np.ones_like(w))
    s = np.float32(qvars.step.numpy())
    np.testing.assert_allclose(s, np.abs(w).max(axis=(0, 1, 2)) / 7, rtol=1e-6)
    codes = np.round(y / q.steps(qvars))
    assert np.abs(codes).max(axis=(0, 1, 2)).tolist() == [7] * 5
    restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q))
    assert restored.init == "max" and q.get_config() == {"num_bits": 4, "per_channel": True, "init": "max"}
    paper = LSQWeightQuantizer(4, init="paper")
    assert keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(paper)).init == "paper"
    assert get_scheme("w4a8_lsq").weight_quantizer().init == "max"
    scheme = get_scheme({"weight_bits": 4, "weight_method": "lsq", "lsq_init": "paper"})
    assert scheme.weight_quantizer().init == "paper"
    with pytest.raises(ValueError, match="lsq_init='mse'; use one of"):
        QuantScheme("x", 4, lsq_init="mse")
    with pytest.raises(ValueError, match=r"init='mean'\): use one of"):
        LSQWeightQuantizer(4, init="mean")
