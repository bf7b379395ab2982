"""MobileNetV3 Small and Large (Howard et al. 2019, https://arxiv.org/abs/1905.02244), with the
minimalistic variants, built for int8 QAT."""
from mobileqat._tf import keras
from mobileqat.architectures._blocks import check_args, check_input_shape, conv_bn_act, make_divisible, stem_stride
from mobileqat.layers import HardSigmoid, HardSwish

L = keras.layers

# One row per inverted residual block: (expansion, output channels, kernel, stride, squeeze-excite, activation).
# kernel "k": 5 (3 when minimalistic); activation "act": hard-swish (ReLU when minimalistic); squeeze-excite
# True: used unless minimalistic. As tf_keras.applications.MobileNetV3Small/Large and the paper's tables 1-2.
STACKS = {
    "small": ((1, 16, 3, 2, True, "relu"), (72 / 16, 24, 3, 2, False, "relu"), (88 / 24, 24, 3, 1, False, "relu"),
              (4, 40, "k", 2, True, "act"), (6, 40, "k", 1, True, "act"), (6, 40, "k", 1, True, "act"),
              (3, 48, "k", 1, True, "act"), (3, 48, "k", 1, True, "act"),
              (6, 96, "k", 2, True, "act"), (6, 96, "k", 1, True, "act"), (6, 96, "k", 1, True, "act")),
    "large": ((1, 16, 3, 1, False, "relu"), (4, 24, 3, 2, False, "relu"), (3, 24, 3, 1, False, "relu"),
              (3, 40, "k", 2, True, "relu"), (3, 40, "k", 1, True, "relu"), (3, 40, "k", 1, True, "relu"),
              (6, 80, 3, 2, False, "act"), (2.5, 80, 3, 1, False, "act"), (2.3, 80, 3, 1, False, "act"),
              (2.3, 80, 3, 1, False, "act"), (6, 112, 3, 1, True, "act"), (6, 112, 3, 1, True, "act"),
              (6, 160, "k", 2, True, "act"), (6, 160, "k", 1, True, "act"), (6, 160, "k", 1, True, "act")),
}
LAST_POINT = {"small": 1024, "large": 1280}  # units of the head's Dense (scaled only when alpha > 1)
STEM_FILTERS = 16  # not scaled with alpha, as in tf_keras
SE_RATIO = 0.25


def _activate(x, activation, name):
    """ReLU (``activation`` "relu") or ``layers.HardSwish`` ("hard_swish") as its own layer ``name``."""
    return L.ReLU(name=name)(x) if activation == "relu" else HardSwish(name=name)(x)


def _conv_bn(x, filters, kernel, strides, bn_momentum, name, activation=None, depthwise=False):
    """Conv2D / DepthwiseConv2D (no bias, same padding) ``name`` -> BN ``{name}_BatchNorm`` [-> activation
    ``{name}_activation``; None: linear]."""
    x = conv_bn_act(x, filters, kernel, strides, bn_momentum, name, f"{name}_BatchNorm", depthwise=depthwise)
    return _activate(x, activation, f"{name}_activation") if activation else x


def squeeze_excite(x, squeeze, prefix):
    """x * hard_sigmoid(conv1x1(relu(conv1x1(GAP(x))))): the gate is one value per channel.

    (N, H, W, C) -> (N, H, W, C). GlobalAveragePooling2D(keepdims) -> Conv2D 1x1 (``squeeze`` filters, bias)
    -> ReLU -> Conv2D 1x1 (C filters, bias) -> ``layers.HardSigmoid`` -> Multiply (broadcast over H, W):
    int8 MEAN, CONV_2D (fused RELU), CONV_2D, ADD + MUL (hard-sigmoid), MUL.
    """
    gate = L.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}squeeze_excite_AvgPool")(x)
    gate = L.Conv2D(squeeze, 1, padding="same", name=f"{prefix}squeeze_excite_Conv")(gate)
    gate = L.ReLU(name=f"{prefix}squeeze_excite_Relu")(gate)
    gate = L.Conv2D(x.shape[-1], 1, padding="same", name=f"{prefix}squeeze_excite_Conv_1")(gate)
    gate = HardSigmoid(name=f"{prefix}squeeze_excite_HardSigmoid")(gate)
    return L.Multiply(name=f"{prefix}squeeze_excite_Mul")([x, gate])


def inverted_residual(x, expansion, filters, kernel, strides, se, activation, block_id, bn_momentum):
    """[expand 1x1 -> BN -> act] -> depthwise ``kernel`` -> BN -> act [-> squeeze-excite] -> project 1x1
    -> BN [-> Add input].

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters). Block 0 has no expand conv and is
    named ``expanded_conv_``, the others ``expanded_conv_{block_id}_``, like tf_keras' names with "/"
    written "_". The residual Add (no activation after it) is used when strides == 1 and C == filters.
    """
    shortcut, in_channels = x, x.shape[-1]
    prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
    expanded = make_divisible(in_channels * expansion)
    if block_id:
        x = _conv_bn(x, expanded, 1, 1, bn_momentum, f"{prefix}expand", activation)
    x = _conv_bn(x, None, kernel, strides, bn_momentum, f"{prefix}depthwise", activation, depthwise=True)
    if se:
        x = squeeze_excite(x, make_divisible(expanded * SE_RATIO), prefix)
    x = _conv_bn(x, filters, 1, 1, bn_momentum, f"{prefix}project")
    if strides == 1 and in_channels == filters:
        x = L.Add(name=f"{prefix}Add")([shortcut, x])
    return x


def mobilenet_v3(variant="small", input_shape=(32, 32, 3), classes=10, alpha=1.0, minimalistic=False, dropout=0.2,
                 classifier_activation="softmax", bn_momentum=0.9, name=None):
    """MobileNetV3 classifier (Small or Large, optionally minimalistic): (N, H, W, C) images -> (N, classes).

    Stem conv 3x3 (16 filters) -> BN -> hard-swish, the variant's inverted residual blocks (11 for Small,
    15 for Large; ``make_divisible(c * alpha)`` output channels; ReLU in the first blocks, hard-swish later;
    depthwise 3x3 or 5x5; squeeze-excite in some blocks; linear projection; residual Add when the shape is
    kept), a 1x1 conv to 6x the last block's channels -> BN -> hard-swish, then GAP -> Dense ``head``
    (1024 Small, 1280 Large, with bias, no BN) -> hard-swish -> Dropout -> Dense ``logits`` (linear) ->
    Activation ``predictions``. The trainable weights have the shapes of
    ``tf_keras.applications.MobileNetV3Small/Large(include_preprocessing=False)`` (its 1x1 convs on the
    pooled vector are the Dense layers here).

    Quantization-friendly: every conv before a BN is bias-free and "same"-padded (no ZeroPadding2D);
    hard-swish is one ``layers.HardSwish`` (one int8 HARD_SWISH), the squeeze-excite gate is
    ``layers.HardSigmoid`` (int8 ADD + RELU6 and MUL), see ``squeeze_excite``. ``minimalistic``: ReLU
    everywhere, 3x3 depthwise kernels, no squeeze-excite (the paper's variant for hardware without
    hard-swish). Input: pixels scaled to [-1, 1] (no Rescaling layer inside).

    Stem stride: 2 when min(H, W) >= 96 (ImageNet schedule, total stride 32, 224 -> 7x7 features); 1 for
    smaller images (total stride 16, 32x32 -> 2x2 features), as the other builders.

    Args:
      variant: "small" or "large".
      input_shape: (H, W, C), H and W >= 32, C in (1, 3).
      classes: number of classes, >= 2.
      alpha: width multiplier (> 0) of the blocks and the last conv (the stem keeps 16 filters; the
        ``head`` Dense grows only when alpha > 1), as tf_keras.
      minimalistic: ReLU, 3x3 kernels, no squeeze-excite.
      dropout: dropout rate before ``logits`` (0 drops the layer); 0.2 as tf_keras.
      classifier_activation: activation of the ``predictions`` layer; None returns logits.
      bn_momentum: BatchNormalization momentum (tf_keras uses 0.999 for ImageNet; 0.9 suits short runs).
      name: model name, default ``mobilenet_v3_{variant}[_minimalistic]_{alpha:.2f}_{H}``.
    Returns:
      A functional ``keras.Model``.
    """
    if variant not in STACKS:
        raise ValueError(f"variant must be 'small' or 'large', got {variant!r}.")
    h, w, c = check_input_shape(input_shape)
    check_args(alpha, classes, dropout)
    act = "relu" if minimalistic else "hard_swish"

    inputs = keras.Input((h, w, c), name="input")
    x = _conv_bn(inputs, STEM_FILTERS, 3, stem_stride((h, w)), bn_momentum, "Conv", act)
    for block_id, (expansion, filters, kernel, strides, se, activation) in enumerate(STACKS[variant]):
        x = inverted_residual(x, expansion, make_divisible(filters * alpha), 3 if minimalistic or kernel == 3 else 5,
                              strides, se and not minimalistic, act if activation == "act" else "relu", block_id,
                              bn_momentum)
    x = _conv_bn(x, make_divisible(x.shape[-1] * 6), 1, 1, bn_momentum, "Conv_1", act)
    x = L.GlobalAveragePooling2D(name="global_pool")(x)
    last_point = LAST_POINT[variant]
    x = L.Dense(make_divisible(last_point * alpha) if alpha > 1.0 else last_point, name="head")(x)
    x = _activate(x, act, "head_activation")
    if dropout:
        x = L.Dropout(dropout, name="dropout")(x)
    x = L.Dense(int(classes), name="logits")(x)
    if classifier_activation is not None:
        x = L.Activation(classifier_activation, name="predictions")(x)
    suffix = "_minimalistic" if minimalistic else ""
    return keras.Model(inputs, x, name=name or f"mobilenet_v3_{variant}{suffix}_{alpha:0.2f}_{h}")
