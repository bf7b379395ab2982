"""EfficientNet-Lite and CIFAR ResNet builders: registry, shapes, published parameter counts, int8-friendly
structure, and end to end (quantize -> fit -> export -> lower): the integer twin equals the file at 0 LSB on
the reference kernels (tensor by tensor) and on XNNPACK."""
import numpy as np
import pytest

from mobileqat import architectures, export, lowering, provenance
from mobileqat._tf import keras
from mobileqat.architectures import MODELS, build, efficientnet_lite, resnet_small
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers
ZOO = ("efficientnet_lite_b0", "efficientnet_lite_b1", "efficientnet_lite_b2", "resnet20", "resnet32", "resnet56")


def _trainable(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def _consumers(layer):
    return [node.outbound_layer for node in layer.outbound_nodes]


def test_registry_and_build():
    assert architectures.BUILDERS["efficientnet_lite"] is efficientnet_lite
    assert architectures.BUILDERS["resnet_small"] is resnet_small
    assert set(ZOO) | {"mobilenet_v1", "mobilenet_v2"} == set(MODELS)
    assert [architectures.takes_alpha(m) for m in ("mobilenet_v2", "resnet20", "efficientnet_lite_b0")] == \
        [True, False, False]
    assert build("mobilenet_v2", (32, 32, 3), 4, alpha=0.35).get_layer("Conv1").filters == 16
    assert build("resnet32", (32, 32, 1), 3).name == "resnet32_32"
    assert build("efficientnet_lite_b1", (32, 32, 3), 3).name == "efficientnet_lite_b1_32"
    with pytest.raises(ValueError, match="resnet20.*no width multiplier"):
        build("resnet20", (32, 32, 3), 10, alpha=0.5)
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        build("resnet18", (32, 32, 3), 10)


@pytest.mark.parametrize("name,shape,classes", [(name, (32, 32, 3), 10) for name in ZOO] + [
    ("efficientnet_lite_b0", (40, 48, 1), 2), ("resnet20", (40, 48, 1), 2)])
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
    (resnet_small, dict(activation="swish"), "activation"), (resnet_small, dict(input_shape=(32, 32, 4)), "input_shape")])
def test_invalid_arguments(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)


def test_save_load_round_trip(tmp_path):
    model = resnet_small(20, input_shape=(32, 32, 1), classes=3, width=4)
    path = tmp_path / "r.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
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


@pytest.mark.parametrize("name", ["efficientnet_lite_blocks", "resnet20"])
def test_quantize_fit_export_lower_is_exact_on_both_runtimes(name, tmp_path):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (32, 32, 32, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    if name == "resnet20":  # the whole ResNet-20, logits out
        float_model = resnet_small(20, input_shape=(32, 32, 3), classes=4, classifier_activation=None)
    else:
        float_model = lite_blocks_net()
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
    assert len(adds) == (9 if name == "resnet20" else 2)
    if name == "resnet20":  # every ReLU after an Add is the ADD's fused activation (no RELU op in the file)
        assert {op.params.get("activation") for op in adds} == {"RELU"}
        assert "RELU" not in file_ops

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
