"""EfficientNet-Lite B0-B2 (Tan & Le 2019, https://arxiv.org/abs/1905.11946; the Lite variants of
tensorflow/tpu ``models/official/efficientnet/lite``), built for int8 QAT."""
import math

from mobileqat._tf import keras
from mobileqat.architectures._blocks import (check_classes_dropout, check_input_shape, classifier_head, conv_bn_act,
                                             make_divisible, stem_stride)

# variant -> (width multiplier, depth multiplier, dropout, resolution the variant was trained at (not used))
VARIANTS = {"b0": (1.0, 1.0, 0.2, 224), "b1": (1.0, 1.1, 0.2, 240), "b2": (1.1, 1.2, 0.3, 260)}
# (expansion, kernel, first stride, input channels, output channels, repeats) of the 7 MBConv stages (B0).
STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))
STEM_FILTERS, HEAD_FILTERS = 32, 1280  # not scaled with width in the Lite variants


def mbconv(x, expansion, kernel, strides, filters, name, bn_momentum):
    """MBConv without squeeze-excite: expand 1x1 (ReLU6; skipped when expansion is 1) -> depthwise
    ``kernel`` x ``kernel`` (ReLU6) -> linear project 1x1 [-> Add input].

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters). The residual Add (no
    activation after it) is used when strides == 1 and C == filters. Layers are named like
    keras.applications.EfficientNetB0: ``{name}expand_conv``, ``{name}dwconv``, ``{name}bn``,
    ``{name}activation``, ``{name}project_conv``, ``{name}project_bn``, ``{name}add``.
    """
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = conv_bn_act(y, in_channels * expansion, 1, 1, bn_momentum, f"{name}expand_conv", f"{name}expand_bn",
                        f"{name}expand_activation")
    y = conv_bn_act(y, None, kernel, strides, bn_momentum, f"{name}dwconv", f"{name}bn", f"{name}activation",
                    depthwise=True)
    y = conv_bn_act(y, filters, 1, 1, bn_momentum, f"{name}project_conv", f"{name}project_bn")
    if strides == 1 and in_channels == filters:
        y = keras.layers.Add(name=f"{name}add")([x, y])
    return y


def efficientnet_lite(variant="b0", input_shape=(32, 32, 3), classes=10, dropout=None,
                      classifier_activation="softmax", bn_momentum=0.9, name=None):
    """EfficientNet-Lite classifier (B0, B1 or B2): (N, H, W, C) images -> (N, classes).

    The TFLite variants of EfficientNet: ReLU6 instead of swish, no squeeze-excite, stem (32
    filters) and head (1x1 conv, 1280 filters) not scaled with width, and the first and last
    stages not scaled with depth. Stem conv 3x3 -> 7 stages of MBConv blocks (expansion 6, first
    stage 1; depthwise 3x3 or 5x5; linear projection; residual Add when the shape is kept) ->
    head conv -> GAP -> Dropout -> Dense ``logits`` (linear) -> Activation ``predictions``.
    Width and depth multipliers: B0 (1.0, 1.0), B1 (1.0, 1.1), B2 (1.1, 1.2); channels rounded to
    multiples of 8 (``make_divisible``), repeats rounded up. Every conv is bias-free, "same"-padded,
    followed by BN (epsilon 1e-3) and ReLU6, except the projections (BN only).
    Stochastic depth (the original's survival probability 0.8) is left out: it needs a layer of its
    own that has no integer op; regularize with ``dropout``.

    Resolution is the caller's (the variants were trained at 224, 240 and 260). Stem stride: 2 when
    min(H, W) >= 96 (ImageNet schedule, total stride 32, 224 -> 7x7 features); 1 for smaller
    images (total stride 16, 32x32 -> 2x2 features), as the MobileNet builders.

    Args:
      variant: "b0", "b1" or "b2".
      input_shape: (H, W, C), H and W >= 32, C in (1, 3).
      classes: number of classes, >= 2.
      dropout: dropout rate before the Dense layer; None: the variant's (0.2, 0.2, 0.3); 0 drops the layer.
      classifier_activation: activation of the ``predictions`` layer; None returns logits.
      bn_momentum: BatchNormalization momentum (the original trains 350 epochs at 0.99; 0.9 suits short runs).
      name: model name, default ``efficientnet_lite_{variant}_{H}``.
    Returns:
      A functional ``keras.Model``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r} (B3/B4 are not built here).")
    width, depth, default_dropout, _ = VARIANTS[variant]
    dropout = default_dropout if dropout is None else dropout
    h, w, c = check_input_shape(input_shape)
    check_classes_dropout(classes, dropout)

    inputs = keras.Input((h, w, c), name="input")
    x = conv_bn_act(inputs, STEM_FILTERS, 3, stem_stride((h, w)), bn_momentum, "stem_conv", "stem_bn",
                    "stem_activation")
    for i, (expansion, kernel, strides, _, c_out, repeats) in enumerate(STAGES):
        if 0 < i < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            x = mbconv(x, expansion, kernel, strides if j == 0 else 1, make_divisible(c_out * width),
                       f"block{i + 1}{chr(ord('a') + j)}_", bn_momentum)
    x = conv_bn_act(x, HEAD_FILTERS, 1, 1, bn_momentum, "top_conv", "top_bn", "top_activation")
    outputs = classifier_head(x, int(classes), dropout, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"efficientnet_lite_{variant}_{h}")
