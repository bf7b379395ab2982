"""Schemes and mixed-precision rules (mobileqat.schemes): presets, n-bit weight grids against numpy,
rules as plain data / JSON, which layer gets which scheme, and rules that cannot apply as errors.
No conversion here (test_low_bits.py exports and runs the files)."""
import json

import numpy as np
import pytest
from conftest import numpy_fake_quant

from mobileqat import schemes
from mobileqat._tf import keras, tf
from mobileqat.quantize import load_qat_model, quantize, scheme_plan
from mobileqat.quantizers import WeightQuantizer, weight_fake_quant_range

L = keras.layers


def net():
    """stem conv+BN+ReLU6, depthwise+BN, SeparableConv2D, plain Conv2D, GAP, Dense, softmax (10x10x3)."""
    inp = keras.Input((10, 10, 3))
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inp)))
    x = L.ReLU(6.0, name="dw_relu")(L.BatchNormalization(name="dw_bn")(
        L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    x = L.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    x = L.Conv2D(6, 1, activation="relu", name="conv_plain")(x)
    x = L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inp, L.Activation("softmax", name="probs")(x), name="net")


MIXED = {"default": "w4a8",
         "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
                   {"match": {"position": "last"}, "scheme": "w8a8"},
                   {"match": {"type": "SeparableConv2D"}, "scheme": {"weight_bits": 3}},
                   {"match": {"regex": "conv_.*"}, "scheme": {"weight_bits": 6, "per_channel": False}}]}


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_n_bit_weights_match_numpy_fake_quant_and_sit_on_the_grid(bits, per_channel, rng):
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32) * np.array([0.1, 1, 3, 0.01, 7], np.float32)
    q = WeightQuantizer(bits, per_channel=per_channel)
    layer = keras.layers.Layer()
    qv = q.build(w.shape, "k", layer)
    out = q(tf.constant(w), True, qv).numpy()
    amax = np.abs(w).max(axis=(0, 1, 2) if per_channel else None)
    np.testing.assert_allclose(out, numpy_fake_quant(w, -amax, amax, bits, narrow_range=True), atol=1e-6 * amax.max())
    step = weight_fake_quant_range(np.float32(qv["max_var"].numpy()), bits) / np.float32(127)
    codes = out / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    top = 2 ** (bits - 1) - 1
    assert np.abs(np.round(codes)).max() == top  # the max|w| channel reaches the grid's end, never beyond


def test_n_bit_straight_through_gradient_inside_range_zero_outside():
    q = WeightQuantizer(4, per_channel=False)
    layer = keras.layers.Layer()
    qv = q.build((6,), "k", layer)
    qv["max_var"].assign(1.0)
    x = tf.constant([-2.0, -0.99, 0.0, 0.3, 0.99, 1.5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, False, qv)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 1, 0])


def test_presets_and_scheme_validation():
    assert schemes.get_scheme("w4a8") == schemes.QuantScheme("w4a8", 4, 8, packed_int4=True)
    assert schemes.get_scheme("w4a8").fully_connected_weight_quantizer(8).packed_int4
    assert not schemes.get_scheme("w4a8").fully_connected_weight_quantizer(7).packed_int4  # XNNPACK: even only
    assert not schemes.get_scheme({"weight_bits": 2, "packed_int4": True}).fully_connected_weight_quantizer(8).packed_int4
    with pytest.raises(ValueError, match="packed INT4 is written and lowered for 4-bit weights only"):
        WeightQuantizer(3, packed_int4=True)
    assert schemes.get_scheme({"weight_bits": 5}).weight_bits == 5
    with pytest.raises(ValueError, match="weight_bits=9.*2 to 8"):
        schemes.QuantScheme("x", 9, 8)
    with pytest.raises(ValueError, match="activation_bits=4.*int8 activations only"):
        schemes.QuantScheme("x", 8, 4)
    with pytest.raises(ValueError, match="unknown field.*'bits'"):
        schemes.get_scheme({"bits": 4})
    with pytest.raises(ValueError, match="narrow_range=False"):
        WeightQuantizer(4, narrow_range=False)


def test_rules_choose_a_scheme_per_layer_by_name_type_and_position():
    plan = scheme_plan(net(), MIXED)
    got = {name: (p["class"], p["scheme"]["weight_bits"], p["scheme"]["per_channel"], p["rule"])
           for name, p in plan.items()}
    assert got == {"stem": ("Conv2D", 8, True, 0),
                   "dw": ("DepthwiseConv2D", 4, True, None),
                   "sep_dw": ("SeparableConv2D", 3, True, 2),  # both halves of the user's SeparableConv2D
                   "sep": ("SeparableConv2D", 3, True, 2),
                   "conv_plain": ("Conv2D", 6, False, 3),
                   "logits": ("Dense", 8, True, 1)}
    assert list(plan) == ["stem", "dw", "sep_dw", "sep", "conv_plain", "logits"]  # graph order


def test_quantize_gives_each_layer_its_schemes_quantizer_and_saving_keeps_it(tmp_path):
    qat = quantize(net(), MIXED)
    bits = {}
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        q = getattr(inner, "weight_quantizer", None) or getattr(getattr(layer, "quantize_config", None),
                                                                "weight_quantizer", None)
        if q is not None:
            bits[layer.name] = (q.num_bits, q.per_channel)
    # Dense and per-tensor schemes are per-tensor; the stem and logits are 8-bit by position
    assert bits == {"quant_stem": (8, True), "quant_dw": (4, True), "quant_sep_dw": (3, True), "quant_sep": (3, True),
                    "quant_conv_plain": (6, False), "quant_logits": (8, False)}
    x = np.random.default_rng(0).uniform(-1, 1, (4, 10, 10, 3)).astype(np.float32)
    qat(x, training=True)
    qat.save(tmp_path / "m.h5")
    loaded = load_qat_model(tmp_path / "m.h5")
    np.testing.assert_allclose(loaded(x).numpy(), qat(x).numpy(), atol=1e-6)
    assert loaded.get_layer("quant_sep_dw").layer.weight_quantizer.num_bits == 3


def test_rules_from_a_json_file_and_a_plain_list(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(MIXED))
    assert scheme_plan(net(), path) == scheme_plan(net(), str(path)) == scheme_plan(net(), MIXED)
    assert schemes.load_rules(path).to_dict() == MIXED
    plan = scheme_plan(net(), [{"match": {"name": ["dw", "sep*"]}, "scheme": "w4a8"}])  # default w8a8
    assert {n for n, p in plan.items() if p["scheme"]["weight_bits"] == 4} == {"dw", "sep", "sep_dw"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        scheme_plan(net(), bad)


@pytest.mark.parametrize("rules, message", [
    ([{"match": {"name": "pool"}, "scheme": "w4a8"}],
     r"rule 0 .*\"pool\".* matches only layers without weights to quantize \('pool' \(GlobalAveragePooling2D\)\); "
     r"fix: match layers with weights"),
    ([{"match": {"name": "conv1*"}, "scheme": "w4a8"}], r"rule 0 .*conv1\*.* matches no layer of the model; fix:.*'stem'"),
    ([{"match": {"type": "Conv2DTranspose"}, "scheme": "w4a8"}], r"rule 0 .* matches no layer"),
    ([{"match": {"type": "Conv2D"}, "scheme": "w8a8"}, {"match": {"name": "stem"}, "scheme": "w4a8"}],
     r"rule 1 .* decides no layer: every layer it matches \('stem'\) is taken by an earlier rule \(rule 0"),
    ([{"match": {"colour": "red"}, "scheme": "w4a8"}], r"rule 0 .*unknown match key\(s\) \['colour'\]"),
    ([{"match": {"position": "middle"}, "scheme": "w4a8"}], r"position 'middle'; use 'first' or 'last'"),
    ([{"match": {"name": "stem"}, "scheme": "w3a8"}], r"rule 0 .*unknown scheme 'w3a8'"),
    ([{"match": {}, "scheme": "w4a8"}], r"non-empty dict.*use 'default'"),
    ({"default": "w4a8", "rule": []}, r"unknown key\(s\) \['rule'\]"),
])
def test_a_rule_that_cannot_apply_is_an_error_naming_it(rules, message):
    with pytest.raises(ValueError, match=message):
        quantize(net(), rules)


def test_every_rule_that_cannot_apply_is_listed_at_once():
    rules = [{"match": {"name": "nothing"}, "scheme": "w4a8"}, {"match": {"name": "stem"}, "scheme": "w4a8"},
             {"match": {"name": "probs"}, "scheme": "w4a8"}]
    with pytest.raises(ValueError) as e:
        quantize(net(), rules)
    assert "rule 0" in str(e.value) and "rule 2" in str(e.value) and "rule 1" not in str(e.value)


def test_layers_a_rewrite_adds_keep_8_bit_weights():
    """A BatchNormalization after an Add gets a fixed 1x1 depthwise (standalone_batchnorm): one weight per
    channel, not the user's; rules do not see it and it keeps 8 bits under a 4-bit default."""
    inp = keras.Input((8, 8, 3))
    a = L.BatchNormalization(name="a_bn")(L.Conv2D(4, 3, padding="same", use_bias=False, name="a")(inp))
    b = L.BatchNormalization(name="b_bn")(L.Conv2D(4, 1, use_bias=False, name="b")(inp))
    x = L.BatchNormalization(name="after_add")(L.Add(name="add")([a, b]))
    model = keras.Model(inp, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    plan = scheme_plan(model, "w4a8")
    assert set(plan) == {"a", "b", "fc", "after_add_scale"}
    assert plan["after_add_scale"]["added_by_rewrite"] and plan["after_add_scale"]["scheme"]["weight_bits"] == 8
    assert plan["a"]["scheme"]["weight_bits"] == 4 and "added_by_rewrite" not in plan["a"]
    qat = quantize(model, "w4a8")
    helper = [la for la in qat.layers if la.name.startswith("quant_after_add")]
    assert helper and all(la.layer.weight_quantizer.num_bits == 8 for la in helper)
    assert qat.get_layer("quant_a").layer.weight_quantizer.num_bits == 4
    with pytest.raises(ValueError, match="matches only layers without weights to quantize"):
        quantize(model, [{"match": {"name": "after_add*"}, "scheme": "w8a8"}])


def test_resolved_spells_out_presets_so_a_changed_preset_gets_a_new_stage_key():
    """``resolved``: preset names inside a scheme or rules become their fields, so the key of a finished stage
    changes when a preset's meaning does (w4a8_lsq's weight initialisation); equal meanings give equal data."""
    from mobileqat.schemes import PRESETS, resolved
    from mobileqat.stages import stage_key
    assert resolved(None) is None
    assert resolved("w4a8_lsq") == PRESETS["w4a8_lsq"].to_dict() and resolved("w4a8_lsq")["lsq_init"] == "max"
    paper = dict(PRESETS["w4a8_lsq"].to_dict(), lsq_init="paper")
    assert stage_key(scheme=resolved("w4a8_lsq")) != stage_key(scheme=resolved(paper))
    rules = {"default": "w4a8", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"}]}
    spelled = {"default": PRESETS["w4a8"].to_dict(),
               "rules": [{"match": {"position": "first"}, "scheme": PRESETS["w8a8"].to_dict()}]}
    assert resolved(rules) == spelled
    assert resolved({"default": PRESETS["w4a8"].to_dict(), "rules": [{"match": {"position": "first"},
                                                                      "scheme": "w8a8"}]}) == spelled
