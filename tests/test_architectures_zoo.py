"""MobileNetV3, EfficientNet-Lite and CIFAR ResNet builders: registry, shapes, published parameter counts, int8-friendly
structure, and end to end (quantize -> fit -> export -> lower): the integer twin equals the file at 0 LSB on
the reference kernels (tensor by tensor) and on XNNPACK."""
import numpy as np
import pytest

from mobileqat import architectures, export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.architectures import MODELS, build, efficientnet_lite, mobilenet_v3, resnet_small
from mobileqat.layers import HardSigmoid, HardSwish
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers
V3 = ("mobilenet_v3_small", "mobilenet_v3_small_minimalistic", "mobilenet_v3_large",
      "mobilenet_v3_large_minimalistic")
ZOO = V3 + ("efficientnet_lite_b0", "efficientnet_lite_b1", "efficientnet_lite_b2", "resnet20", "resnet32", "resnet56")


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _consumers(layer):
    return [node.outbound_layer for node in layer.outbound_nodes]


def test_registry_and_build():
    assert architectures.BUILDERS["efficientnet_lite"] is efficientnet_lite
    assert architectures.BUILDERS["resnet_small"] is resnet_small
    assert architectures.BUILDERS["mobilenet_v3"] is mobilenet_v3
    assert set(ZOO) | {"mobilenet_v1", "mobilenet_v2"} == set(MODELS)
    assert [architectures.takes_alpha(m) for m in ("mobilenet_v2", "resnet20", "efficientnet_lite_b0",
                                                   "mobilenet_v3_large_minimalistic")] == [True, False, False, True]
    assert build("mobilenet_v2", (32, 32, 3), 4, alpha=0.35).get_layer("Conv1").filters == 16
    assert build("resnet32", (32, 32, 1), 3).name == "resnet32_32"
    assert build("efficientnet_lite_b1", (32, 32, 3), 3).name == "efficientnet_lite_b1_32"
    assert build("mobilenet_v3_large_minimalistic", (32, 32, 3), 3, alpha=0.5).name == \
        "mobilenet_v3_large_minimalistic_0.50_32"
    with pytest.raises(ValueError, match="resnet20.*no width multiplier"):
        build("resnet20", (32, 32, 3), 10, alpha=0.5)
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        build("resnet18", (32, 32, 3), 10)


@pytest.mark.parametrize("name,shape,classes", [(name, (32, 32, 3), 10) for name in ZOO] + [
    ("efficientnet_lite_b0", (40, 48, 1), 2), ("resnet20", (40, 48, 1), 2), ("mobilenet_v3_small", (40, 48, 1), 2),
    ("mobilenet_v3_large", (96, 96, 3), 3)])
def test_output_shapes(name, shape, classes):
    model = build(name, shape, classes)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, classes)
    out = model(np.zeros((2, *shape), np.float32)).numpy()
    assert out.shape == (2, classes)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("depth,trainable", [(20, 272_474), (32, 466_906), (56, 855_770)])
def test_resnet_param_counts(depth, trainable):
    """He et al. 2016, table 6: 0.27 M, 0.46 M, 0.85 M with identity (zero-padding) shortcuts; the two 1x1
    projection shortcuts (conv + BN gamma/beta) add 2,752."""
    model = resnet_small(depth)
    assert _trainable(model) == trainable
    assert _trainable(model) - 16 * 32 - 32 * 64 - 2 * 32 - 2 * 64 == {20: 269_722, 32: 464_154,
                                                                             56: 853_018}[depth]
    assert round(_trainable(model) / 1e6, 2) == {20: 0.27, 32: 0.47, 56: 0.86}[depth]


@pytest.mark.parametrize("variant,trainable,total,published,blocks,adds", [
    ("b0", 4_652_008, 4_694_024, 4.65, 16, 9), ("b1", 5_416_680, 5_470_344, 5.4, 21, 14),
    ("b2", 6_092_072, 6_150_168, 6.1, 21, 14)])
def test_efficientnet_lite_at_224_param_counts_and_structure(variant, trainable, total, published, blocks, adds):
    """Parameters as published (tensorflow/tpu's EfficientNet-Lite README: Lite0 4.7 M, i.e. 4,652,008
    trainable, Lite1 5.4 M, Lite2 6.1 M); blocks, kernels, strides and channels of the Lite variants."""
    model = efficientnet_lite(variant, input_shape=(224, 224, 3), classes=1000)
    assert (_trainable(model), model.count_params()) == (trainable, total)  # total: + BN moving statistics
    assert round(trainable / 1e6, 1 if variant != "b0" else 2) == published
    assert tuple(model.get_layer("global_pool").input.shape[1:]) == (7, 7, 1280)
    dw = [la for la in model.layers if isinstance(la, L.DepthwiseConv2D)]
    assert len(dw) == blocks
    assert len([la for la in model.layers if isinstance(la, L.Add)]) == adds
    width = 1.1 if variant == "b2" else 1.0
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280  # not scaled
    assert model.get_layer("stem_conv").strides == (2, 2)
    assert "block1a_expand_conv" not in [la.name for la in model.layers]  # expansion 1
    assert model.get_layer("block2a_expand_conv").filters == 6 * 16
    assert model.get_layer("block7a_project_conv").filters == (320 if width == 1.0 else 352)
    assert model.get_layer("block6a_project_conv").filters == (192 if width == 1.0 else 208)
    assert model.get_layer("block5a_project_conv").filters == (112 if width == 1.0 else 120)
    kernels = {la.name[:6]: la.kernel_size[0] for la in dw}
    assert [kernels[f"block{i}"] for i in range(1, 8)] == [3, 3, 5, 3, 5, 5, 3]
    assert [la.strides[0] for la in dw if la.name.endswith("a_dwconv")] == [1, 2, 2, 2, 1, 2, 1]
    drop = model.get_layer("dropout")
    assert drop.rate == {"b0": 0.2, "b1": 0.2, "b2": 0.3}[variant]
    # depth multiplier: the first and last stages keep their one block
    assert "block1b_dwconv" not in [la.name for la in dw] and "block7b_dwconv" not in [la.name for la in dw]


def _tf_keras_name(name):
    """Our layer name of a tf_keras.applications MobileNetV3 layer: "/" written "_", the 1x1 convs on the
    pooled vector are the Dense layers ``head`` and ``logits``."""
    return {"Conv_2": "head", "Logits": "logits"}.get(name, name.replace("/", "_"))


@pytest.mark.parametrize("variant,minimalistic,alpha,published", [
    ("small", False, 1.0, 2.5), ("small", True, 1.0, 2.0), ("large", False, 1.0, 5.4), ("large", True, 1.0, 3.9),
    ("small", False, 0.75, None), ("large", True, 0.5, None)])
def test_mobilenet_v3_at_224_has_the_weights_of_tf_keras_applications(variant, minimalistic, alpha, published):
    """Layer by layer, the same weight shapes, kernels and strides as tf_keras.applications' MobileNetV3 (the
    paper's tables 1-2; weights=None, no Rescaling); parameters as published (paper table 3: Small 2.5 M,
    Large 5.4 M; tensorflow/models' slim README: minimalistic Small 2.0 M, Large 3.9 M)."""
    ref = getattr(keras.applications, f"MobileNetV3{variant.title()}")(
        input_shape=(224, 224, 3), alpha=alpha, minimalistic=minimalistic, weights=None, include_preprocessing=False)
    model = mobilenet_v3(variant, (224, 224, 3), 1000, alpha=alpha, minimalistic=minimalistic)
    assert _trainable(model) == _trainable(ref) and model.count_params() == ref.count_params()
    if published:
        assert int(_trainable(model) / 1e5) / 10 == published  # 2,542,856 / 2,044,736 / 5,483,032 / 3,924,288
    weighted = [la for la in ref.layers if la.weights]
    assert len(weighted) == len([la for la in model.layers if la.weights])
    for la in weighted:
        ours = model.get_layer(_tf_keras_name(la.name))
        assert [int(np.prod(w.shape)) for w in ours.weights] == [int(np.prod(w.shape)) for w in la.weights], la.name
        if isinstance(la, L.Conv2D) and not isinstance(ours, L.Dense):
            assert (ours.kernel.shape, ours.strides, ours.use_bias) == (la.kernel.shape, la.strides, la.use_bias)
            assert ours.padding == "same"  # tf_keras: ZeroPadding2D + "valid" before a stride-2 depthwise
    assert model.get_layer("global_pool").input.shape[1:3] == (7, 7)
    kinds = [type(la) for la in model.layers]
    assert (HardSwish in kinds, HardSigmoid in kinds, L.Multiply in kinds) == (not minimalistic,) * 3


@pytest.mark.parametrize("name", V3)
def test_mobilenet_v3_int8_friendly_structure(name):
    """Convs before BN bias-free and "same"; BN -> ReLU or HardSwish (one int8 op each) or nothing (projections);
    squeeze-excite: GAP(keepdims) -> 1x1 conv + bias -> ReLU -> 1x1 conv + bias -> HardSigmoid -> Multiply with the
    block's activation; minimalistic: ReLU only, 3x3 kernels, no squeeze-excite. 32x32 -> 2x2 features."""
    model = build(name, (32, 32, 3), 10, alpha=0.5)
    minimalistic, small = name.endswith("minimalistic"), "small" in name
    allowed = (L.InputLayer, L.Conv2D, L.DepthwiseConv2D, L.BatchNormalization, L.ReLU, HardSwish, HardSigmoid,
               L.Multiply, L.Add, L.GlobalAveragePooling2D, L.Dropout, L.Dense, L.Activation)
    assert all(isinstance(la, allowed) for la in model.layers), [type(la).__name__ for la in model.layers]
    assert model.get_layer("global_pool").input.shape[1:3] == (2, 2) and model.get_layer("Conv").strides == (1, 1)
    acts = [type(la) for la in model.layers if isinstance(la, (L.ReLU, HardSwish))]
    assert (HardSwish in acts) == (not minimalistic) and all(la.max_value is None for la in model.layers
                                                               if isinstance(la, L.ReLU))
    se_gates = 0
    for conv in (la for la in model.layers if isinstance(la, (L.Conv2D, L.DepthwiseConv2D))):
        assert conv.padding == "same" and conv.activation is keras.activations.linear, conv.name
        (after,) = _consumers(conv)
        if isinstance(after, L.BatchNormalization):
            assert conv.use_bias is False and after.epsilon == 1e-3, conv.name
            kinds = [type(la) for la in _consumers(after)]
            if conv.name.endswith("_project"):
                assert not any(k in (L.ReLU, HardSwish) for k in kinds), conv.name
            else:
                assert kinds in ([L.ReLU], [HardSwish]), conv.name
        else:  # squeeze-excite
            assert conv.use_bias and conv.kernel_size == (1, 1), conv.name
            if conv.name.endswith("_Conv"):
                assert isinstance(after, L.ReLU) and isinstance(_consumers(conv.input.node.layer)[0], L.Conv2D)
                assert conv.input.node.layer.keepdims
            else:
                (mul,) = _consumers(after)
                assert isinstance(after, HardSigmoid) and isinstance(mul, L.Multiply)
                gated = mul.input[0].node.layer
                assert isinstance(gated, (L.ReLU, HardSwish)) and gated.name.endswith("_depthwise_activation")
                se_gates += 1
    depthwise = [la for la in model.layers if isinstance(la, L.DepthwiseConv2D)]
    assert len(depthwise) == (11 if small else 15)
    assert se_gates == (0 if minimalistic else 9 if small else 8)
    assert sum(la.kernel_size == (5, 5) for la in depthwise) == (0 if minimalistic else 8 if small else 6)
    assert [la.strides[0] for la in depthwise] == ([2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1] if small else
                                                   [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1])
    assert model.get_layer("dropout").rate == 0.2 and model.get_layer("head").units == (1024 if small else 1280)


@pytest.mark.parametrize("name", ["efficientnet_lite_b0", "resnet20"])
def test_int8_friendly_structure(name):
    model = build(name, (32, 32, 3), 10)
    allowed = (L.InputLayer, L.Conv2D, L.DepthwiseConv2D, L.BatchNormalization, L.ReLU, L.Add,
               L.GlobalAveragePooling2D, L.Dropout, L.Dense, L.Activation)
    assert all(isinstance(la, allowed) for la in model.layers), [type(la).__name__ for la in model.layers]
    relu_max = 6.0 if name.startswith("efficientnet") else None
    for conv in (la for la in model.layers if isinstance(la, (L.Conv2D, L.DepthwiseConv2D))):
        assert conv.use_bias is False and conv.padding == "same", conv.name
        assert conv.activation is keras.activations.linear, conv.name
        (bn,) = _consumers(conv)
        assert isinstance(bn, L.BatchNormalization) and bn.epsilon == 1e-3
        after = _consumers(bn)
        linear = conv.name.endswith(("project_conv", "_2_conv", "_0_conv"))
        if linear:  # linear bottleneck, second conv of a basic block, projection shortcut: BN only
            assert not any(isinstance(la, (L.ReLU, L.Activation)) for la in after), conv.name
        else:
            assert [type(la) for la in after] == [L.ReLU], conv.name
            assert after[0].max_value == relu_max
    for add in (la for la in model.layers if isinstance(la, L.Add)):
        after = _consumers(add)
        if name.startswith("resnet"):  # ReLU after the Add: fused into the int8 ADD
            assert [type(la) for la in after] == [L.ReLU] and after[0].name == add.name[:-len("add")] + "out"
        else:
            assert not any(isinstance(la, L.ReLU) for la in after)


def test_resnet_stages_and_shortcuts():
    model = resnet_small(20, input_shape=(32, 32, 3), width=8, activation="relu6")
    assert [la.name for la in model.layers if la.name.endswith("_0_conv")] == ["conv3_block1_0_conv",
                                                                                 "conv4_block1_0_conv"]
    assert model.get_layer("conv3_block1_0_conv").strides == (2, 2)
    assert model.get_layer("conv2_block3_2_conv").filters == 8
    assert model.get_layer("conv4_block3_out").output.shape[1:] == (8, 8, 32)
    assert all(la.max_value == 6.0 for la in model.layers if isinstance(la, L.ReLU))
    assert len([la for la in model.layers if isinstance(la, L.Add)]) == 9


@pytest.mark.parametrize("builder,kwargs,match", [
    (efficientnet_lite, dict(variant="b3"), "variant"), (efficientnet_lite, dict(input_shape=(28, 28, 3)), "input_shape"),
    (efficientnet_lite, dict(dropout=1.0), "dropout"), (efficientnet_lite, dict(classes=1), "classes"),
    (resnet_small, dict(depth=18), "depth"), (resnet_small, dict(width=0), "width"),
    (resnet_small, dict(activation="swish"), "activation"), (resnet_small, dict(input_shape=(32, 32, 4)), "input_shape"),
    (mobilenet_v3, dict(variant="medium"), "variant"), (mobilenet_v3, dict(alpha=0), "alpha"),
    (mobilenet_v3, dict(input_shape=(16, 16, 3)), "input_shape"), (mobilenet_v3, dict(dropout=-0.1), "dropout")])
def test_invalid_arguments(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)


@pytest.mark.parametrize("name,suffix", [("resnet20", "keras"), ("mobilenet_v3_small", "keras"),
                                         ("mobilenet_v3_small", "h5")])
def test_save_load_round_trip(name, suffix, tmp_path):
    """No custom_objects: HardSwish / HardSigmoid are registered Keras objects."""
    if name == "resnet20":
        model = resnet_small(20, input_shape=(32, 32, 1), classes=3, width=4)
    else:
        model = mobilenet_v3("small", (32, 32, 1), 3, alpha=0.35)
    path = tmp_path / f"m.{suffix}"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# --- end to end: the integer twin of each architecture at 0 LSB -----------------------------------

def lite_blocks_net(input_shape=(32, 32, 3), classes=4):
    """Every block kind of EfficientNet-Lite, made by its own functions, in 5 MBConv blocks instead of 16:
    stem, expansion 1 (k3), expansion 6 with k3 and k5 at stride 2 and 1 (residual Adds), head conv, logits.
    (The whole B0 goes through the same path in ``mobileqat demo --model efficientnet_lite_b0``; here the
    converter's ~2 minutes for 49 convs would exceed the test budget.)"""
    from mobileqat.architectures._blocks import classifier_head, conv_bn_act
    from mobileqat.architectures.efficientnet_lite import mbconv
    inputs = keras.Input(input_shape)
    x = conv_bn_act(inputs, 16, 3, 1, 0.9, "stem_conv", "stem_bn", "stem_activation")
    for i, (expansion, kernel, strides, filters) in enumerate([(1, 3, 1, 8), (6, 3, 2, 16), (6, 3, 1, 16),
                                                              (6, 5, 2, 24), (6, 5, 1, 24)]):
        x = mbconv(x, expansion, kernel, strides, filters, f"block{i + 1}a_", 0.9)
    x = conv_bn_act(x, 64, 1, 1, 0.9, "top_conv", "top_bn", "top_activation")
    return keras.Model(inputs, classifier_head(x, classes, 0.2, None), name="lite_blocks")


E2E = {  # the whole model, logits out (the Lite blocks net: every block kind of EfficientNet-Lite)
    "efficientnet_lite_blocks": lambda: lite_blocks_net(),
    "resnet20": lambda: resnet_small(20, input_shape=(32, 32, 3), classes=4, classifier_activation=None),
    # hard-swish, squeeze-excite (ReLU and hard-swish blocks), 3x3 and 5x5, Dense head -> HARD_SWISH
    "mobilenet_v3_small": lambda: mobilenet_v3("small", (32, 32, 3), 4, alpha=0.5, classifier_activation=None),
    # ReLU only (fused into CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED), the 15 blocks of Large
    "mobilenet_v3_large_minimalistic": lambda: mobilenet_v3("large", (32, 32, 3), 4, alpha=0.35, minimalistic=True,
                                                            classifier_activation=None),
}


@pytest.mark.parametrize("name", list(E2E))
def test_quantize_fit_export_lower_is_exact_on_both_runtimes(name, tmp_path):
    """(Small and Large share every function of the builder: Large with hard-swish and squeeze-excite, Small
    minimalistic and every model at alpha 1.0 go through the same path in ``models/zoo_cards.py``.)"""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    float_model = E2E[name]()
    qat = quantize(float_model)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                run_eagerly=True)  # 2 steps: eager is faster than tracing the train step
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / f"{name}.tflite")
    export.export_tflite(qat, path, "qat_int8")

    twin = lowering.lower(qat)
    mapped = provenance.file_tensors(twin, path)  # same graph, weights, biases, scales and zero points
    ref = TFLiteModel(path, "reference", preserve_all_tensors=True)
    it = ref.interpreter
    file_ops = [op["op_name"] for op in it._get_ops_details()]
    lowered = [op for op in twin.ops if op.kind not in ("identity", "reshape")]
    assert sorted(lowering.TFLITE_OPS[op.kind] for op in lowered) == sorted(file_ops)
    adds = [op for op in lowered if op.kind == "add"]
    assert len(adds) == len([la for la in float_model.layers if isinstance(la, L.Add)]) > 0
    if name == "resnet20":  # every ReLU after an Add is the ADD's fused activation (no RELU op in the file)
        assert {op.params.get("activation") for op in adds} == {"RELU"}
    if name.startswith("mobilenet_v3"):
        se = len([la for la in float_model.layers if isinstance(la, HardSigmoid)])
        assert (file_ops.count("MEAN"), file_ops.count("HARD_SWISH")) == (
            (9 + 1, 1 + 2 * 8 + 2) if name == "mobilenet_v3_small" else (1, 0))  # SE + GAP; stem, blocks 3-10, top
        assert file_ops.count("MUL") == 2 * se and se == (9 if name == "mobilenet_v3_small" else 0)
    if not name.startswith("efficientnet"):
        assert not {"RELU", "RELU6"} & set(file_ops)  # every ReLU is fused

    codes = ref.quantize_input(x[:8])
    np.testing.assert_array_equal(twin.quantize_input(x[:8]), codes)
    out = ref.invoke_raw(codes)
    values = twin.run(codes, "reference", keep_all=True)
    for lop in lowered:  # tensor by tensor on the reference kernels
        expected = it.get_tensor(mapped[lop.output])
        np.testing.assert_array_equal(values[lop.output].reshape(expected.shape), expected, err_msg=lop.output)
    np.testing.assert_array_equal(twin.run(codes, "reference"), out)
    xnn = TFLiteModel(path, "xnnpack")
    np.testing.assert_array_equal(twin.run(codes, "xnnpack"), xnn.invoke_raw(codes))
    if name.startswith("mobilenet_v3"):  # the QAT model reloads from .h5 (no custom_objects) with the same twin
        qat.save(tmp_path / "qat.h5")
        np.testing.assert_array_equal(lowering.lower(load_qat_model(tmp_path / "qat.h5")).run(codes, "xnnpack"),
                                      xnn.invoke_raw(codes))


def test_cli_offers_the_zoo_and_refuses_alpha_without_width(tmp_path, capsys):
    from mobileqat import cli
    parser = cli.build_parser()
    for command in (["demo"], ["run", "--data", "d"]):
        args = parser.parse_args(command + ["--out", "o", "--model", "efficientnet_lite_b2"])
        assert cli._config(args).model == "efficientnet_lite_b2"
    assert parser.parse_args(["demo", "--out", "o"]).model is None and cli._config(
        parser.parse_args(["demo", "--out", "o"])).alpha == 0.35  # the demo's defaults: MobileNetV2-0.35
    code = cli.main(["demo", "--model", "resnet20", "--alpha", "0.5", "--out", str(tmp_path / "o")])
    assert code == 2 and "resnet20 has no width multiplier" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
