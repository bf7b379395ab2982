"""Quantization-friendly building blocks shared by the MobileNet builders.

Every convolution is bias-free with ``padding="same"`` and feeds exactly one
``BatchNormalization(epsilon=1e-3)``, optionally followed by ``ReLU(6.0)``, so the
chain folds into a single int8 TFLite conv with a fused ReLU6.
"""
from mobileqat._tf import keras

layers = keras.layers

ALLOWED_CHANNELS = (1, 3)
MIN_SIZE = 32


def make_divisible(v, divisor=8, min_value=None):
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), never dropping > 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _bn_relu6(x, name, bn_momentum, relu6):
    x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-3, name=f"{name}_BN")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu6 else x


def conv_bn_relu6(x, filters, kernel, strides, name, bn_momentum, relu6=True):
    """Conv2D (no bias, same padding) -> BN -> ReLU6 (``relu6=False``: linear, stops after BN).

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters). Layers are named
    ``name``, ``name_BN`` and ``name_relu``.
    """
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    return _bn_relu6(x, name, bn_momentum, relu6)


def depthwise_bn_relu6(x, strides, name, bn_momentum, depth_multiplier=1, kernel=3):
    """DepthwiseConv2D (no bias, same padding) -> BN -> ReLU6.

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), C * depth_multiplier).
    """
    x = layers.DepthwiseConv2D(kernel, strides=strides, depth_multiplier=depth_multiplier,
                               padding="same", use_bias=False, name=name)(x)
    return _bn_relu6(x, name, bn_momentum, relu6=True)


def classifier_head(x, classes, dropout, classifier_activation, name="logits"):
    """GAP -> Dropout (skipped when 0) -> linear Dense ``name`` -> Activation ``predictions``.

    (N, H, W, C) -> (N, classes). The activation is its own layer (none when
    ``classifier_activation`` is None), so the Dense converts to a plain int8 FullyConnected.
    """
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(classes, name=name)(x)
    if classifier_activation is not None:
        x = layers.Activation(classifier_activation, name="predictions")(x)
    return x


def check_input_shape(input_shape):
    """Validate ``input_shape`` = (H, W, C) with H, W >= 32 and C in (1, 3); returns it as a tuple of ints."""
    fix = (f"pass input_shape=(H, W, C) with H and W >= {MIN_SIZE} and C in {ALLOWED_CHANNELS}, "
           "e.g. (32, 32, 3); resize or pad smaller images, convert other channel counts to 1 or 3.")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a tuple of 3 ints, got {input_shape!r}: {fix}") from None
    if len(shape) != 3:
        raise ValueError(f"input_shape must have 3 entries (H, W, C), got {input_shape!r}: {fix}")
    h, w, c = shape
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"input_shape {shape} is too small (H and W must be >= {MIN_SIZE}): {fix}")
    if c not in ALLOWED_CHANNELS:
        raise ValueError(f"input_shape {shape} has {c} channels, expected 1 or 3: {fix}")
    return shape


def check_args(alpha, classes, dropout):
    """Validate the width multiplier, the class count and the dropout rate."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (width multiplier, e.g. 0.35, 0.5, 1.0), got {alpha!r}.")
    if int(classes) != classes or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}; for one binary output use classes=2.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")


def stem_stride(input_shape):
    """2 (ImageNet schedule, total stride 32) when min(H, W) >= 96, else 1 (total stride 16)."""
    return 2 if min(input_shape[:2]) >= 96 else 1


def conv_bn_act(x, filters, kernel, strides, bn_momentum, conv_name, bn_name, act_name=None, depthwise=False,
                max_value=6.0):
    """Conv2D or DepthwiseConv2D (no bias, same padding) -> BN -> ReLU(``max_value``), with explicit names.

    For builders named like keras.applications (``block2a_expand_conv``/``_bn``/``_activation``,
    ``conv2_block1_1_conv``/``_bn``/``_relu``). ``act_name`` None: linear, stops after BN.
    ``max_value`` 6.0: ReLU6; None: plain ReLU. ``filters`` is ignored for depthwise convs (multiplier 1).
    """
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False, name=conv_name)(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=conv_name)(x)
    x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-3, name=bn_name)(x)
    return layers.ReLU(max_value, name=act_name)(x) if act_name else x


def check_classes_dropout(classes, dropout):
    """Validate the class count and the dropout rate (builders without a width multiplier)."""
    check_args(1.0, classes, dropout)
