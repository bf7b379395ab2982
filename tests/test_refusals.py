"""quantize() refuses what it cannot quantize with one mobileqat ValueError, before TensorFlow/tfmot run.

One case per rule of the refusal list (``mobileqat.quantize.MODEL_RULES`` / ``LAYER_RULES`` and the
BatchNormalization fold conditions ``transforms.FOLD_CONDITIONS``): a tiny model, the name and class the
message must give, and words of the fix.
"""
import mobileqat  # noqa: F401  (selects Keras 2 before TensorFlow is imported)

import importlib

import pytest

from mobileqat import transforms
from mobileqat._tf import keras, tf
from mobileqat.quantize import audit, quantize, quantize_config_for
from mobileqat.schemes import get_scheme

L = keras.layers
quantize_module = importlib.import_module("mobileqat.quantize")  # mobileqat.quantize is also the function


def _model(inp, out, name="m"):
    return keras.Model(inp, out, name=name)


def _head(x):
    return L.Dense(2, name="head")(L.Flatten(name="flat")(x))


def _conv_bn(conv, shape=(8, 8, 4), bn=None):
    inp = keras.Input(shape)
    return _model(inp, _head((bn or L.BatchNormalization(name="bn"))(conv(inp))))


def _one(layer, shape=(8, 8, 3), dtype="float32"):
    inp = keras.Input(shape, dtype=dtype, name="image")
    return _model(inp, _head(layer(inp)))


# --- model builders, one per refusal -----------------------------------------------------------------

class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.conv = L.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)


def subclassed():
    return _Subclassed()


def unbuilt_sequential():
    return keras.Sequential([L.Conv2D(2, 3), L.Flatten(), L.Dense(2)], name="seq")


def input_only():
    inp = keras.Input((4,))
    return _model(inp, inp)


def two_inputs():
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    return _model([a, b], _head(L.Add(name="add")([a, b])))


def two_outputs():
    inp = keras.Input((4,))
    return _model(inp, [L.Dense(2, name="h1")(inp), L.Dense(3, name="h2")(inp)])


def shared_layer():
    inp = keras.Input((8, 8, 3))
    conv = L.Conv2D(3, 3, padding="same", name="twice")
    return _model(inp, _head(conv(conv(inp))))


def nested_model():
    inner = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(2, 3)], name="inner")
    inp = keras.Input((8, 8, 3))
    return _model(inp, _head(inner(inp)))


def tf_op():
    inp = keras.Input((8, 8, 3))
    return _model(inp, _head(tf.math.cos(inp)))


def lambda_layer():
    return _one(L.Lambda(lambda t: tf.math.sin(t), name="lam"))


def uint8_input():
    inp = keras.Input((4,), dtype="uint8", name="image")
    return _model(inp, L.Dense(2, name="head")(inp))


def float16_layer():
    return _one(L.Conv2D(2, 3, dtype="float16", name="half"))


def grouped_conv():
    return _conv_bn(L.Conv2D(4, 3, groups=2, name="grouped"))


def dilated_conv():
    return _conv_bn(L.Conv2D(4, 3, dilation_rate=2, name="dilated"))


def dilated_depthwise():
    return _conv_bn(L.DepthwiseConv2D(3, dilation_rate=2, name="dilated_dw"))


def channels_first_conv():
    return _one(L.Conv2D(2, 3, data_format="channels_first", name="cf_conv"), shape=(3, 8, 8))


def channels_first_pool():
    return _one(L.MaxPooling2D(data_format="channels_first", name="cf_pool"))


def conv_tanh():
    return _one(L.Conv2D(2, 3, activation="elu", name="elu_conv"))


def dense_swish():  # split into Dense, sigmoid and Multiply (quantize.REWRITES)
    inp = keras.Input((4,))
    return _model(inp, L.Dense(2, activation="swish", name="probs")(inp))


def dense_rank3():
    inp = keras.Input((4, 3))
    return _model(inp, L.Flatten(name="flat")(L.Dense(2, name="dense3d")(inp)))


def activation_elu():  # sigmoid, tanh, swish, relu, relu6, softmax have int8 ops
    return _one(L.Activation("elu", name="act_elu"))


def relu_max3():
    return _one(L.ReLU(3.0, name="relu3"))


def softmax_axis1():
    inp = keras.Input((4, 3))
    return _model(inp, L.Flatten(name="flat")(L.Softmax(axis=1, name="sm1")(inp)))


def depthwise_alone():
    return _one(L.DepthwiseConv2D(3, name="dw_alone"))


def batchnorm_alone():
    return _one(L.BatchNormalization(name="lonely_bn"))


def batchnorm_after_dense():
    inp = keras.Input((4,))
    return _model(inp, L.BatchNormalization(name="bn_dense")(L.Dense(3, name="dense")(inp)))


def conv_output_also_elsewhere():
    inp = keras.Input((8, 8, 3))
    c = L.Conv2D(4, 3, name="conv")(inp)
    return _model(inp, _head(L.Add(name="add")([L.BatchNormalization(name="bn_branch")(c), c])))


def conv_relu_then_bn():
    return _conv_bn(L.Conv2D(4, 3, activation="relu", name="conv"), bn=L.BatchNormalization(name="bn_after_relu"))


def bn_without_scale():
    return _conv_bn(L.Conv2D(4, 3, name="conv"), bn=L.BatchNormalization(scale=False, name="bn_noscale"))


def bn_virtual_batch():
    return _conv_bn(L.Conv2D(4, 3, name="conv"), bn=L.BatchNormalization(virtual_batch_size=2, name="bn_ghost"))


def bn_axis1():
    return _conv_bn(L.Conv2D(4, 3, name="conv"), bn=L.BatchNormalization(axis=1, name="bn_axis1"))


def custom_regularizer():
    inp = keras.Input((4,))
    return _model(inp, L.Dense(2, kernel_regularizer=lambda w: 0.0 * tf.reduce_sum(w), name="reg_dense")(inp))


def _no_mapping(layer, shape):
    return lambda: _one(layer(), shape=shape)


# (builder, the name and class the message must name, words of the fix)
CASES = {
    "subclassed model": (subclassed, "model 'sub' (_Subclassed)", "functional or Sequential"),
    "unbuilt Sequential": (unbuilt_sequential, "model 'seq' (Sequential)", "keras.Input(shape)"),
    "no layers": (input_only, "model 'm' (Functional)", "add the layers"),
    "two inputs": (two_inputs, "model 'm' (Functional)", "one image input"),
    "two outputs": (two_outputs, "model 'm' (Functional)", "one output"),
    "dilated Conv1D": (_no_mapping(lambda: L.Conv1D(2, 3, dilation_rate=2, name="c1d"), (8, 3)),
                       "layer 'c1d' (Conv1D)", "use dilation_rate=1"),
    "Conv3D": (_no_mapping(lambda: L.Conv3D(2, 3, name="c3d"), (4, 4, 4, 3)), "layer 'c3d' (Conv3D)", "replace it"),
    "Conv2DTranspose no bias + ReLU": (_no_mapping(lambda: L.Conv2DTranspose(2, 3, use_bias=False, activation="relu",
                                                                    name="up"), (8, 8, 3)),
                                       "layer 'up' (Conv2DTranspose)", "use_bias=True"),
    "LocallyConnected2D": (_no_mapping(lambda: L.LocallyConnected2D(2, 3, name="lc"), (8, 8, 3)),
                           "layer 'lc' (LocallyConnected2D)", "replace it"),
    "Lambda": (lambda_layer, "layer 'lam' (Lambda)", "use the Keras layer instead of the TensorFlow op"),
    "TFOpLambda": (tf_op, "layer 'tf.math.cos' (TFOpLambda)", "layers.ReLU"),
    "uint8 input": (uint8_input, "layer 'image' (InputLayer)", "dtype='float32'"),
    "float16 layer": (float16_layer, "layer 'half' (Conv2D)", "float32 policy"),
    "dilated conv": (dilated_conv, "layer 'dilated' (Conv2D)", "use dilation_rate=1"),
    "dilated depthwise": (dilated_depthwise, "layer 'dilated_dw' (DepthwiseConv2D)", "use dilation_rate=1"),
    "channels_first conv": (channels_first_conv, "layer 'cf_conv' (Conv2D)", "data_format='channels_last'"),
    "channels_first pooling": (channels_first_pool, "layer 'cf_pool' (MaxPooling2D)", "data_format='channels_last'"),
    "conv activation": (conv_tanh, "layer 'elu_conv' (Conv2D)", "its own Activation layer"),
    "dense rank 3": (dense_rank3, "layer 'dense3d' (Dense)", "Flatten or GlobalAveragePooling2D before it"),
    "activation layer": (activation_elu, "layer 'act_elu' (Activation)", "use ReLU or ReLU6"),
    "relu max 3": (relu_max3, "layer 'relu3' (ReLU)", "use ReLU or ReLU6"),
    "softmax axis": (softmax_axis1, "layer 'sm1' (Softmax)", "Softmax(axis=-1)"),
    "BN after Dense": (batchnorm_after_dense, "layer 'bn_dense' (BatchNormalization)",
                       "directly after a Conv2D/DepthwiseConv2D"),
    "BN virtual batch": (bn_virtual_batch, "layer 'bn_ghost' (BatchNormalization)", "virtual_batch_size=None"),
    "BN axis": (bn_axis1, "layer 'bn_axis1' (BatchNormalization)", "axis=-1"),
    "custom object": (custom_regularizer, "layer 'reg_dense' (Dense)", "register_keras_serializable"),
}


# Refused before quantize.REWRITES existed; each is now rewritten into layers mobileqat quantizes.
NOW_ACCEPTED = {"nested model": nested_model,
                "separable": _no_mapping(lambda: L.SeparableConv2D(2, 3, name="sep"), (8, 8, 3)),
                "BN scale=False": bn_without_scale, "conv activation before BN": conv_relu_then_bn,
                "conv feeds BN and more": conv_output_also_elsewhere, "dense swish": dense_swish,
                "depthwise without BN": depthwise_alone, "standalone BN": batchnorm_alone,
                "shared layer": shared_layer, "grouped conv": grouped_conv}


@pytest.mark.parametrize("case", sorted(NOW_ACCEPTED))
def test_models_the_rewrites_fix_quantize(case):
    model = NOW_ACCEPTED[case]()
    assert audit(model) == []
    qat = quantize(model)
    assert not any(type(getattr(la, "layer", la)).__name__ in ("BatchNormalization", "SeparableConv2D", "Sequential")
                   for la in qat.layers)


@pytest.fixture
def tf_unreachable(monkeypatch):
    """Fail the test if quantize() gets past the audit (to folding or tfmot)."""
    def reached(*args, **kwargs):
        raise AssertionError("quantize() went past the audit")
    monkeypatch.setattr(transforms, "fold_batchnorm", reached)
    monkeypatch.setattr(quantize_module._qk, "quantize_apply", reached)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the custom-object case serializes a lambda
@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_names_layer_class_and_fix(case, tf_unreachable):
    build, where, fix = CASES[case]
    with pytest.raises(ValueError) as err:
        quantize(build())
    msg = str(err.value)
    line = next((ln for ln in msg.splitlines() if where in ln), None)
    assert line is not None, msg
    assert fix in line.split("; fix: ", 1)[-1], msg
    assert msg.count("\n  - ") == 1, msg  # one problem, reported once


def test_dilated_conv_is_blamed_not_its_batchnorm():
    msg = str(pytest.raises(ValueError, quantize, dilated_conv()).value)
    assert "'dilated' (Conv2D): dilation_rate=(2, 2)" in msg and "'bn'" not in msg


def test_regnet_passes_the_audit():
    """RegNetX002 was refused for its grouped convolutions (groups=3..46); they fold and lower now
    (tests/test_ops_grouped.py), and nothing else in it is refused."""
    model = keras.applications.RegNetX002(weights=None, input_shape=(32, 32, 3), classes=10)
    assert audit(model) == []


def test_every_problem_is_listed_in_one_error():
    inp = keras.Input((8, 8, 4))
    x = L.DepthwiseConv2D(3, dilation_rate=2, padding="same", name="dilated_dw")(inp)
    x = L.BatchNormalization(name="bn_g")(x)
    x = L.Conv2D(4, 3, dilation_rate=2, name="dilated")(x)
    x = L.Lambda(lambda t: tf.math.sin(t), name="lam")(x)
    x = L.BatchNormalization(name="lonely_bn")(x)  # rewritten (standalone_batchnorm): no problem
    x = L.Activation("elu", name="elu")(x)
    x = L.Dense(3, activation="tanh", name="dense3d")(x)  # rewritten: 1x1 Conv2D, then its own tanh
    model = _model(inp, L.Flatten(name="flat")(x))
    problems = audit(model)
    assert [(p.name, p.cls) for p in problems] == [
        ("dilated_dw", "DepthwiseConv2D"), ("dilated", "Conv2D"), ("lam", "Lambda"), ("elu", "Activation")]
    msg = str(pytest.raises(ValueError, quantize, model).value)
    assert "(4 problems" in msg and all(str(p) in msg for p in problems)
    assert "'bn_g'" not in msg  # its convolution's line says why it is not folded


def test_supported_model_passes_the_audit_and_quantizes():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(6.0, name="relu_a")(L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, padding="same", name="a")(inp)))
    y = L.BatchNormalization(name="bn_dw")(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x))
    x = L.Add(name="add")([x, L.Conv2D(4, 1, activation="relu", name="pw")(y)])
    x = L.MaxPooling2D(name="pool")(L.ZeroPadding2D(name="pad")(x))
    x = L.Dense(3, name="dense")(L.Dropout(0.1, name="drop")(L.GlobalAveragePooling2D(name="gap")(x)))
    model = _model(inp, L.Softmax(name="softmax")(x))
    assert audit(model) == []
    qat = quantize(model)
    inner = [type(getattr(la, "layer", la)).__name__ for la in qat.layers]
    assert inner.count("FoldedConvBN") == 2 and "BatchNormalization" not in inner


def test_quantize_config_for_has_no_messages_of_its_own():
    scheme = get_scheme("w8a8")
    assert quantize_config_for(L.LayerNormalization(), scheme) is None
    assert quantize_config_for(L.Activation("elu"), scheme) is None
    assert quantize_config_for(L.Dense(2), scheme) is not None


def test_fold_batchnorm_folds_a_grouped_conv():
    folded = transforms.fold_batchnorm(grouped_conv())
    assert [type(la).__name__ for la in folded.layers][1:3] == ["FoldedConvBN", "Flatten"]
    assert folded.layers[1].groups == 2
