"""quantize.REWRITES: each rewrite keeps the float function and the weights, and together they let
models that were refused quantize, export and lower to the integer twin at 0 LSB."""
import numpy as np
import pytest

from mobileqat import export, lowering, provenance, transforms
from mobileqat._tf import keras
from mobileqat.quantize import REWRITES, audit, load_qat_model, quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def _randomize_bn(model, seed=0):
    """Non-trivial BatchNormalization statistics and affine parameters, so that a rewrite that drops or
    misplaces one shows in the output."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 2.0, w.shape).astype(np.float32) if "variance" in w.name or
                               "gamma" in w.name else rng.uniform(-0.5, 0.5, w.shape).astype(np.float32)
                               for w in layer.weights])
        if isinstance(layer, keras.Model):
            _randomize_bn(layer, seed + 1)
    return model


def _same_function(model, rewritten, shape, low=-1.0, high=1.0):
    x = np.random.default_rng(3).uniform(low, high, (4,) + shape).astype(np.float32)
    np.testing.assert_allclose(rewritten(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5)


def nested():
    inner = keras.Sequential([L.Conv2D(4, 3, use_bias=False, name="conv"), L.BatchNormalization(name="bn"),
                              L.ReLU(name="relu")], name="backbone")
    inner.build((None, 8, 8, 3))
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(3, 1, name="conv")(inp)  # the same name as a layer of the backbone
    return keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(inner(x))))


def tf_ops():
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 3, padding="same", name="b")(inp)
    x = keras.activations.relu(a + b)  # TFOpLambda: __operators__.add, then nn.relu
    return keras.Model(inp, L.GlobalAveragePooling2D()(x * b))


def separable():
    inp = keras.Input((9, 9, 3))
    x = L.SeparableConv2D(5, 3, strides=2, padding="same", depth_multiplier=1, use_bias=True, name="sep")(inp)
    x = L.ReLU()(L.BatchNormalization(name="sep_bn")(L.SeparableConv2D(4, 3, use_bias=False, name="sep2")(x)))
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def grouped_and_dense():
    inp = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 3, groups=4, padding="same", name="grouped")(inp)  # a depthwise convolution
    x = L.Dense(6, activation="relu", name="pointwise")(x)  # Dense on (N, H, W, C): a 1x1 convolution
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def preprocessing():
    inp = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inp)
    norm = L.Normalization(mean=[0.1, -0.2, 0.3], variance=[0.5, 2.0, 1.5], name="norm")
    x = L.Conv2D(4, 3, name="conv")(norm(x))
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def standalone_bn():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inp)
    y = L.BatchNormalization(name="after_conv")(x)  # the conv's output also goes to the Add: no fold
    x = L.Add(name="add")([x, y])
    x = L.ReLU(6.0, name="relu")(L.BatchNormalization(name="after_add")(x))
    x = L.BatchNormalization(scale=False, name="no_scale")(L.Conv2D(4, 3, use_bias=False, name="conv2")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw_alone")(x)  # depthwise with bias, no BN
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def layer_scale():
    """ConvNeXt's LayerScale (x * gamma per channel) after a Conv2D with bias, a DepthwiseConv2D without one
    and a Dense on (N, H, W, C); the last one follows a conv with a second user, so it stays."""
    from tf_keras.src.applications.convnext import LayerScale
    rng = np.random.default_rng(4)

    def scale(name, channels):
        layer = LayerScale(1e-6, channels, name=name)
        layer.build((None, channels))
        layer.set_weights([rng.uniform(-2, 2, channels).astype(np.float32)])
        return layer

    inp = keras.Input((8, 8, 3))
    x = scale("ls_conv", 4)(L.Conv2D(4, 3, padding="same", name="conv")(inp))
    x = scale("ls_dw", 8)(L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, padding="same", name="dw")(x))
    x = scale("ls_dense", 5)(L.Dense(5, name="pointwise")(x))
    y = L.Conv2D(5, 1, name="shared")(x)
    x = L.Add(name="add")([y, scale("ls_kept", 5)(y)])
    return keras.Model(inp, L.GlobalAveragePooling2D()(x))


def relu_layers():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0, name="se_relu")(L.Conv2D(4, 1, name="se_reduce")(inp))
    x = L.ReLU(name="fc_relu")(L.Dense(5, name="fc")(L.GlobalAveragePooling2D()(x)))
    return keras.Model(inp, L.Dense(2, name="logits")(x))


@pytest.mark.parametrize("build,shape,rewrite,gone", [
    (relu_layers, (8, 8, 3), transforms.fuse_relu, "ReLU"),
    (nested, (8, 8, 3), transforms.flatten_nested, "Sequential"),
    (tf_ops, (8, 8, 3), transforms.tf_ops_to_layers, "TFOpLambda"),
    (separable, (9, 9, 3), transforms.split_separable, "SeparableConv2D"),
    (grouped_and_dense, (8, 8, 4), transforms.grouped_to_depthwise, None),
    (layer_scale, (8, 8, 3), lambda m: transforms.fold_layer_scale(transforms.dense_to_conv(m)), None),
    (grouped_and_dense, (8, 8, 4), transforms.dense_to_conv, "Dense"),
    (preprocessing, (8, 8, 3), transforms.preprocessing_to_conv, "Rescaling"),
    (standalone_bn, (8, 8, 3), transforms.standalone_batchnorm, None),
])
def test_rewrite_keeps_the_function(build, shape, rewrite, gone):
    keras.utils.set_random_seed(0)
    model = _randomize_bn(build())
    rewritten = rewrite(model)
    assert rewritten is not model
    _same_function(model, rewritten, shape, 0.0 if build is preprocessing else -1.0,
                   255.0 if build is preprocessing else 1.0)
    if gone:
        assert gone not in {type(layer).__name__ for layer in rewritten.layers}
    # and then folded, as quantize does
    _same_function(model, transforms.fold_batchnorm(rewritten), shape, 0.0 if build is preprocessing else -1.0,
                   255.0 if build is preprocessing else 1.0)


def test_rewrites_leave_a_model_they_do_not_apply_to_alone():
    model = nested().layers[2]  # the Sequential backbone: nothing to rewrite
    for rewrite in REWRITES[1:]:
        assert rewrite(model) is model


def test_relu_after_conv_and_dense_keeps_the_weights_fake_quantized():
    qat = quantize(relu_layers())
    for name in ("quant_se_reduce", "quant_fc"):
        layer = qat.get_layer(name)
        assert layer._weight_vars and layer.layer.get_config()["activation"] in ("relu", "relu6"), name


def test_flatten_renames_a_clashing_layer_and_keeps_each_weight():
    model = nested()
    flat = transforms.flatten_nested(model)
    names = [layer.name for layer in flat.layers]
    assert "conv" in names and "backbone_conv" in names and "backbone" not in names
    np.testing.assert_array_equal(flat.get_layer("backbone_conv").kernel, model.layers[2].layers[0].kernel)


def test_layer_scale_folds_into_the_layer_before_it():
    model = layer_scale()
    folded = transforms.fold_layer_scale(transforms.dense_to_conv(model))
    names = {layer.name for layer in folded.layers}
    assert not {"ls_conv", "ls_dw", "ls_dense"} & names and "ls_kept" in names  # 'shared' has two users
    np.testing.assert_allclose(folded.get_layer("dw").bias.numpy(), 0.0)
    np.testing.assert_allclose(folded.get_layer("conv").bias.numpy(),
                               model.get_layer("conv").bias.numpy() * model.get_layer("ls_conv").weights[0].numpy())
    (problem,) = audit(model)
    assert (problem.name, problem.cls) == ("ls_kept", "LayerScale") and "folds its per-channel scale" in problem.fix


def test_grouped_conv_becomes_depthwise():
    rewritten = transforms.grouped_to_depthwise(grouped_and_dense())
    assert type(rewritten.get_layer("grouped")) is L.DepthwiseConv2D


def test_a_refusal_after_a_rewrite_names_the_class_the_user_wrote():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, L.Flatten()(L.Dense(3, activation="elu", name="dense4d")(inp)))
    (problem,) = audit(model)
    assert (problem.name, problem.cls) == ("dense4d", "Dense") and "elu" in problem.why


def byo_net():
    """A model with every rewrite at once (except activations whose ops are added elsewhere)."""
    inner = keras.Sequential([L.SeparableConv2D(6, 3, padding="same", use_bias=False, name="sep"),
                              L.BatchNormalization(name="sep_bn"), L.ReLU(6.0, name="sep_relu")], name="block")
    inner.build((None, 6, 6, 6))
    inp = keras.Input((12, 12, 3))
    x = L.Rescaling(1 / 255.0, name="rescale")(inp)
    x = L.Conv2D(6, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = L.ReLU(6.0, name="stem_relu")(L.BatchNormalization(scale=False, name="stem_bn")(x))
    y = inner(x)
    x = L.BatchNormalization(name="post_add_bn")(x + y)  # TFOpLambda, then a BN that follows an Add
    x = L.Conv2D(6, 3, groups=6, padding="same", name="grouped")(x)
    x = L.Dense(8, activation="relu", name="pointwise")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Activation("softmax", name="probs")(L.Dense(4, name="logits")(x)), name="byo")


def test_a_model_using_every_rewrite_exports_and_lowers_at_zero_lsb(tmp_path):
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (64, 12, 12, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 127.5).astype(int) + 2 * (x[..., 1].std(axis=(1, 2)) > 73)
    model = _randomize_bn(byo_net())
    assert audit(model) == []
    qat = quantize(model)
    qat.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = tmp_path / "byo.tflite"
    export.export_tflite(qat, path)
    twin = lowering.lower(qat)
    assert provenance.first_difference(twin, path) is None
    for runtime in ("reference", "xnnpack"):
        m = TFLiteModel(path, runtime)
        codes = m.quantize_input(x)
        np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes))
    # saved and loaded without custom_objects, the QAT model re-exports the same bytes
    export.save_keras_model(qat, tmp_path / "byo.h5")
    loaded = load_qat_model(tmp_path / "byo.h5")
    export.export_tflite(loaded, tmp_path / "again.tflite")
    assert (tmp_path / "again.tflite").read_bytes() == path.read_bytes()


def layer_norm_net():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(4, 3, use_bias=False, name="conv")(inp)))
    x = L.LayerNormalization(axis=1, name="ln")(x)  # over H: refused (over the last axis it is int8 ops)
    return keras.Model(inp, L.Dense(3, name="logits")(L.Flatten()(x)))  # (a mean over H would cancel it)


def test_keep_float_keeps_a_refused_layer_float_with_a_warning(tmp_path):
    keras.utils.set_random_seed(2)
    model = layer_norm_net()
    with pytest.raises(ValueError, match="layer 'ln' \\(LayerNormalization\\)"):
        quantize(model)
    with pytest.raises(ValueError, match="keep_float names no layer.*'nope'"):
        quantize(model, keep_float=["nope"])
    with pytest.warns(UserWarning, match="(?s)keeping 1 layer.*'ln' \\(LayerNormalization\\)"):
        qat = quantize(model, keep_float=["ln"])
    x = np.random.default_rng(2).uniform(-1, 1, (32, 8, 8, 3)).astype(np.float32)
    qat.compile("adam", "mse")
    qat.fit(x, np.zeros((32, 3), np.float32), epochs=1, verbose=0)
    path = tmp_path / "kept.tflite"
    with pytest.raises(ValueError, match="allow_float_ops=True"):
        export.export_tflite(qat, path)
    assert not path.exists()
    export.export_tflite(qat, path, allow_float_ops=True)
    want = qat(x, training=False).numpy()
    for runtime in ("reference", "xnnpack"):
        m = TFLiteModel(path, runtime)
        scale, zero = m.output_quantization
        got = (m.predict(x).astype(np.float32) - zero) * scale
        assert np.abs(got - want).max() < 0.1 * np.abs(want).max() + 4 * scale  # float inside, int8 around
    with pytest.raises(ValueError, match="'quant_ln'"):
        lowering.lower(qat)


def test_a_shared_layer_becomes_one_copy_per_call():
    inp = keras.Input((8, 8, 3))
    conv = L.Conv2D(3, 3, padding="same", name="twice")
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(conv(conv(inp)))))
    unshared = transforms.unshare_layers(model)
    _same_function(model, unshared, (8, 8, 3))
    assert {"twice", "twice_call2"} <= {layer.name for layer in unshared.layers}
    np.testing.assert_array_equal(unshared.get_layer("twice_call2").kernel, conv.kernel)
    assert audit(model) == []
