"""MobileNet builders: shapes, width multiplier, int8-friendly structure, parity with tf-keras, training, saving."""
import numpy as np
import pytest

from mobileqat._tf import keras
from mobileqat.architectures import BUILDERS, mobilenet_v1, mobilenet_v2

L = keras.layers
ALLOWED = (L.InputLayer, L.Conv2D, L.DepthwiseConv2D, L.BatchNormalization, L.ReLU, L.Add,
           L.GlobalAveragePooling2D, L.Dropout, L.Dense, L.Activation)
SMALL = {"mobilenet_v1": dict(alpha=0.25), "mobilenet_v2": dict(alpha=0.35)}
MOBILENETS = tuple(SMALL)  # the other builders: tests/test_architectures_zoo.py


def _divisible(v, d=8):
    """The MobileNetV2 channel rounding, written independently of the package."""
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


def _small(arch, **kw):
    return BUILDERS[arch](**{**SMALL[arch], **kw})


def _consumers(layer):
    return [node.outbound_layer for node in layer.outbound_nodes]


def test_builders_registry():
    assert {k: BUILDERS[k] for k in MOBILENETS} == {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2}


@pytest.mark.parametrize("arch", MOBILENETS)
@pytest.mark.parametrize("shape,classes", [((32, 32, 1), 2), ((32, 32, 3), 10), ((40, 48, 3), 10), ((96, 96, 3), 2)])
def test_output_shapes(arch, shape, classes):
    model = _small(arch, input_shape=shape, classes=classes)
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, classes)
    out = model(np.zeros((2, *shape), np.float32)).numpy()
    assert out.shape == (2, classes)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("arch", MOBILENETS)
@pytest.mark.parametrize("shape,features", [((32, 32, 3), (2, 2)), ((40, 48, 3), (3, 3)), ((96, 96, 3), (3, 3)),
                                            ((224, 224, 3), (7, 7))])
def test_stem_stride_rule(arch, shape, features):
    model = _small(arch, input_shape=shape)
    stem = model.get_layer("conv1" if arch == "mobilenet_v1" else "Conv1")
    assert stem.strides == ((1, 1) if min(shape[:2]) < 96 else (2, 2))
    assert tuple(model.get_layer("global_pool").input.shape[1:3]) == features


def test_alpha_sets_channels_v2():
    small, wide = mobilenet_v2(alpha=0.35), mobilenet_v2(alpha=1.4)
    assert small.get_layer("Conv1").filters == _divisible(32 * 0.35) == 16
    assert small.get_layer("block_3_expand").filters == 6 * _divisible(24 * 0.35) == 48
    assert small.get_layer("block_16_project").filters == _divisible(320 * 0.35) == 112
    assert small.get_layer("Conv_1").filters == 1280
    assert wide.get_layer("block_16_project").filters == _divisible(320 * 1.4) == 448
    assert wide.get_layer("Conv_1").filters == _divisible(1280 * 1.4) == 1792
    assert "expanded_conv_expand" not in [layer.name for layer in small.layers]  # first block: expansion 1
    assert small.get_layer("block_3_depthwise").strides == (2, 2)
    assert small.get_layer("block_4_depthwise").strides == (1, 1)


def test_alpha_and_depth_multiplier_set_channels_v1():
    model = mobilenet_v1(alpha=0.25, depth_multiplier=2)
    assert model.get_layer("conv1").filters == int(32 * 0.25) == 8
    assert model.get_layer("conv_pw_6").filters == int(512 * 0.25) == 128
    assert model.get_layer("conv_pw_13").filters == int(1024 * 0.25) == 256
    assert model.get_layer("conv_dw_1").output.shape[-1] == 8 * 2
    assert len([la for la in model.layers if isinstance(la, L.DepthwiseConv2D)]) == 13


@pytest.mark.parametrize("arch", MOBILENETS)
def test_int8_friendly_structure(arch):
    model = _small(arch, dropout=0.2, bn_momentum=0.95)
    assert all(isinstance(layer, ALLOWED) for layer in model.layers), [type(la).__name__ for la in model.layers]
    convs = [la for la in model.layers if isinstance(la, (L.Conv2D, L.DepthwiseConv2D))]
    assert convs
    for conv in convs:
        assert conv.use_bias is False and conv.padding == "same", conv.name
        assert conv.activation is keras.activations.linear, conv.name
        (bn,) = _consumers(conv)
        assert isinstance(bn, L.BatchNormalization) and bn.name == conv.name + "_BN"
        assert (bn.momentum, bn.epsilon) == (0.95, 1e-3)
        after_bn = _consumers(bn)
        if conv.name.endswith("_project"):  # MobileNetV2 linear bottleneck
            assert not any(isinstance(la, (L.ReLU, L.Activation)) for la in after_bn), conv.name
        else:
            assert [type(la) for la in after_bn] == [L.ReLU] and after_bn[0].name == conv.name + "_relu"
    for relu in (la for la in model.layers if isinstance(la, L.ReLU)):
        assert float(relu.max_value) == 6.0 and float(relu.negative_slope) == 0 and float(relu.threshold) == 0
    for add in (la for la in model.layers if isinstance(la, L.Add)):
        assert not any(isinstance(la, (L.ReLU, L.Activation)) for la in _consumers(add))
    if arch == "mobilenet_v2":
        assert len([la for la in model.layers if isinstance(la, L.Add)]) == 10

    pred, logits, drop, gap = model.layers[-1], model.layers[-2], model.layers[-3], model.layers[-4]
    assert isinstance(pred, L.Activation) and pred.name == "predictions"
    assert pred.activation is keras.activations.softmax
    assert isinstance(logits, L.Dense) and logits.name == "logits"
    assert logits.activation is keras.activations.linear
    assert isinstance(drop, L.Dropout) and drop.rate == 0.2
    assert isinstance(gap, L.GlobalAveragePooling2D)


@pytest.mark.parametrize("arch", MOBILENETS)
def test_no_activation_gives_logits_and_zero_dropout_drops_layer(arch):
    model = _small(arch, classifier_activation=None, dropout=0.0)
    assert isinstance(model.layers[-1], L.Dense) and model.layers[-1].name == "logits"
    assert isinstance(model.layers[-2], L.GlobalAveragePooling2D)
    assert not any(isinstance(la, (L.Activation, L.Dropout)) for la in model.layers)


def test_default_names():
    assert mobilenet_v1(alpha=0.25).name == "mobilenet_v1_0.25_32"
    assert mobilenet_v2(alpha=0.35, input_shape=(40, 48, 3)).name == "mobilenet_v2_0.35_40"
    assert mobilenet_v2(alpha=0.35, name="net").name == "net"


@pytest.mark.parametrize("arch", MOBILENETS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(input_shape=(28, 28, 1)), "input_shape"), (dict(input_shape=(32, 31, 3)), "input_shape"),
    (dict(input_shape=(32, 32, 4)), "input_shape"), (dict(input_shape=(32, 32)), "input_shape"),
    (dict(input_shape=(None, 32, 3)), "input_shape"), (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"),
    (dict(classes=1), "classes"), (dict(dropout=1.0), "dropout")])
def test_invalid_arguments(arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BUILDERS[arch](**kwargs)


def test_param_count_matches_keras_applications_at_224():
    # Same structure as tf-keras (no conv biases; V1's 1x1-conv head with bias has the parameters of a Dense).
    ours = mobilenet_v2(input_shape=(224, 224, 3), alpha=1.0, classes=1000)
    ref = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), alpha=1.0, classes=1000)
    assert ours.count_params() == ref.count_params() == 3538984
    ours = mobilenet_v1(input_shape=(224, 224, 3), alpha=1.0, classes=1000)
    ref = keras.applications.MobileNet(weights=None, input_shape=(224, 224, 3), alpha=1.0, classes=1000)
    assert ours.count_params() == ref.count_params() == 4253864


@pytest.mark.parametrize("arch,ref_builder,alpha,features", [
    ("mobilenet_v1", keras.applications.MobileNet, 0.25, "conv_pw_13_relu"),
    ("mobilenet_v2", keras.applications.MobileNetV2, 0.35, "Conv_1_relu")])
def test_backbone_identical_to_keras_applications(arch, ref_builder, alpha, features, rng):
    """Same layers, weight shapes and, with the same weights, the same features (even sizes: "same" == their pads)."""
    shape = (96, 96, 3)  # stem stride 2, as in tf-keras
    ours = BUILDERS[arch](input_shape=shape, alpha=alpha)
    ref = ref_builder(weights=None, include_top=False, input_shape=shape, alpha=alpha)
    ours_backbone = keras.Model(ours.input, ours.get_layer(features).output)
    mine = [la for la in ours_backbone.layers if la.weights]
    theirs = [la for la in ref.layers if la.weights]
    assert [type(la) for la in mine] == [type(la) for la in theirs]
    for a, b in zip(mine, theirs):
        assert [w.shape for w in a.get_weights()] == [w.shape for w in b.get_weights()], (a.name, b.name)
        if isinstance(b, L.BatchNormalization):
            n = b.gamma.shape[0]
            b.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                           rng.uniform(0.5, 2, n)])
        a.set_weights(b.get_weights())
    assert ours_backbone.count_params() == ref.count_params()
    x = rng.uniform(-1, 1, (2, *shape)).astype(np.float32)
    np.testing.assert_allclose(ours_backbone(x).numpy(), ref(x).numpy(), atol=1e-4)


def test_tiny_mobilenet_v2_trains(rng):
    keras.utils.set_random_seed(0)
    model = mobilenet_v2(alpha=0.35)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = rng.uniform(0, 1, (64, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    hist = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


@pytest.mark.parametrize("arch", MOBILENETS)
def test_clone_and_save_load_round_trip(arch, tmp_path, rng):
    model = _small(arch, input_shape=(32, 32, 1), classes=3)
    for layer in model.layers:  # non-trivial BN statistics
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2, n)])
    x = rng.uniform(0, 1, (4, 32, 32, 1)).astype(np.float32)
    expected = model.predict(x, verbose=0)

    clone = keras.models.clone_model(model)
    assert [la.name for la in clone.layers] == [la.name for la in model.layers]
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone.predict(x, verbose=0), expected)

    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == model.name
    assert [la.get_config() for la in loaded.layers] == [la.get_config() for la in model.layers]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
