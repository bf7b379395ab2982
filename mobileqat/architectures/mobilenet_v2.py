"""MobileNetV2 (Sandler et al. 2018, https://arxiv.org/abs/1801.04381), built for int8 QAT."""
from mobileqat._tf import keras
from mobileqat.architectures._blocks import (check_args, check_input_shape, classifier_head, conv_bn_relu6,
                                             depthwise_bn_relu6, make_divisible, stem_stride)

# (expansion t, output channels c, repeats n, first stride s) of the inverted residual stages.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def inverted_residual(x, expansion, filters, strides, block_id, bn_momentum):
    """Expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> linear project 1x1 [-> Add input].

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters). The residual Add
    (no activation after it) is used when strides == 1 and C == filters. Block 0 has no
    expand conv and is named ``expanded_conv``, like keras.applications.
    """
    in_channels = x.shape[-1]
    prefix = f"block_{block_id}" if block_id else "expanded_conv"
    y = x
    if expansion != 1:
        y = conv_bn_relu6(y, expansion * in_channels, 1, 1, f"{prefix}_expand", bn_momentum)
    y = depthwise_bn_relu6(y, strides, f"{prefix}_depthwise", bn_momentum)
    y = conv_bn_relu6(y, filters, 1, 1, f"{prefix}_project", bn_momentum, relu6=False)
    if strides == 1 and in_channels == filters:
        y = keras.layers.Add(name=f"{prefix}_add")([x, y])
    return y


def mobilenet_v2(input_shape=(32, 32, 3), classes=10, alpha=1.0, dropout=0.0,
                 classifier_activation="softmax", bn_momentum=0.9, name=None):
    """MobileNetV2 classifier: (N, H, W, C) images -> (N, classes).

    Stem conv 3x3 (``make_divisible(32 * alpha)`` filters), 17 inverted residual blocks
    (expansion 6, first block 1; ``make_divisible(c * alpha)`` output channels), a last
    1x1 conv with 1280 filters (``make_divisible(1280 * alpha)`` when alpha > 1), then
    GAP -> Dropout (if > 0) -> Dense ``logits`` (linear) -> Activation ``predictions``.
    Every conv is bias-free, "same"-padded, followed by BN and ReLU6, except the linear
    projections (BN only). The backbone matches ``keras.applications.MobileNetV2``
    (same weights), minus its ZeroPadding2D layers.

    Stem stride: 2 when min(H, W) >= 96 (ImageNet schedule, total stride 32, 224 -> 7x7
    features); 1 for smaller images (total stride 16, 32x32 -> 2x2 features).

    Args:
      input_shape: (H, W, C), H and W >= 32, C in (1, 3).
      classes: number of classes, >= 2.
      alpha: width multiplier (> 0).
      dropout: dropout rate before the Dense layer (0, the default, drops the layer).
      classifier_activation: activation of the ``predictions`` layer; None returns logits.
      bn_momentum: BatchNormalization momentum.
      name: model name, default ``mobilenet_v2_{alpha:.2f}_{H}``.
    Returns:
      A functional ``keras.Model``.
    """
    h, w, c = check_input_shape(input_shape)
    check_args(alpha, classes, dropout)

    inputs = keras.Input((h, w, c), name="input")
    x = conv_bn_relu6(inputs, make_divisible(32 * alpha), 3, stem_stride((h, w)), "Conv1", bn_momentum)
    block_id = 0
    for t, c_out, n, s in STAGES:
        for i in range(n):
            x = inverted_residual(x, t, make_divisible(c_out * alpha), s if i == 0 else 1, block_id, bn_momentum)
            block_id += 1
    last_filters = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = conv_bn_relu6(x, last_filters, 1, 1, "Conv_1", bn_momentum)
    outputs = classifier_head(x, int(classes), dropout, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"mobilenet_v2_{alpha:0.2f}_{h}")
