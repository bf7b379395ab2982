"""The CIFAR ResNets (He et al. 2016, https://arxiv.org/abs/1512.03385, section 4.2), built for int8 QAT."""
from mobileqat._tf import keras
from mobileqat.architectures._blocks import check_classes_dropout, check_input_shape, classifier_head, conv_bn_act

DEPTHS = (20, 32, 56)
_MAX_VALUE = {"relu": None, "relu6": 6.0}


def basic_block(x, filters, strides, name, bn_momentum, max_value):
    """conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN, Add the shortcut, ReLU.

    (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters). The shortcut is the input,
    or a 1x1 conv (stride ``strides``) -> BN when the shape changes (the paper's option B). Named
    like keras.applications.ResNet: ``{name}_1_conv``, ``{name}_2_bn``, ``{name}_0_conv`` (shortcut),
    ``{name}_add``, ``{name}_out``.
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_bn_act(x, filters, 1, strides, bn_momentum, f"{name}_0_conv", f"{name}_0_bn")
    y = conv_bn_act(x, filters, 3, strides, bn_momentum, f"{name}_1_conv", f"{name}_1_bn", f"{name}_1_relu",
                    max_value=max_value)
    y = conv_bn_act(y, filters, 3, 1, bn_momentum, f"{name}_2_conv", f"{name}_2_bn")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(max_value, name=f"{name}_out")(y)


def resnet_small(depth=20, input_shape=(32, 32, 3), classes=10, width=16, activation="relu", dropout=0.0,
                 classifier_activation="softmax", bn_momentum=0.9, name=None):
    """CIFAR ResNet-``depth`` classifier: (N, H, W, C) images -> (N, classes).

    conv 3x3 (``width`` filters) -> BN -> ReLU, then 3 stages of n = (depth - 2) / 6 basic blocks
    with ``width``, 2 * ``width``, 4 * ``width`` filters (the first block of stages 2 and 3 has
    stride 2 and a 1x1 projection conv + BN shortcut), then GAP -> Dropout (if > 0) -> Dense
    ``logits`` (linear) -> Activation ``predictions``. Every conv is bias-free, "same"-padded and
    followed by BN; the ReLU after each residual Add fuses into the int8 ADD. No stem stride: total
    stride 4 (32x32 -> 8x8 features), as in the paper; resolution is the caller's.

    Args:
      depth: 20, 32 or 56 (0.27 M, 0.47 M, 0.86 M trainable parameters at width 16 and 10 classes;
        the paper's 0.27 M, 0.46 M, 0.85 M have identity shortcuts, without the two projections' 2,752).
      input_shape: (H, W, C), H and W >= 32, C in (1, 3).
      classes: number of classes, >= 2.
      width: filters of the stem and the first stage (16 in the paper).
      activation: "relu" (the paper's) or "relu6".
      dropout: dropout rate before the Dense layer (0, the default, drops the layer).
      classifier_activation: activation of the ``predictions`` layer; None returns logits.
      bn_momentum: BatchNormalization momentum.
      name: model name, default ``resnet{depth}_{H}``.
    Returns:
      A functional ``keras.Model``.
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS} (6n + 2 with n = 3, 5, 9), got {depth!r}.")
    if int(width) != width or width < 1:
        raise ValueError(f"width must be an int >= 1 (filters of the first stage, 16 in the paper), got {width!r}.")
    if activation not in _MAX_VALUE:
        raise ValueError(f"activation must be 'relu' or 'relu6', got {activation!r}.")
    h, w, c = check_input_shape(input_shape)
    check_classes_dropout(classes, dropout)
    max_value, width, n = _MAX_VALUE[activation], int(width), (depth - 2) // 6

    inputs = keras.Input((h, w, c), name="input")
    x = conv_bn_act(inputs, width, 3, 1, bn_momentum, "conv1_conv", "conv1_bn", "conv1_relu", max_value=max_value)
    for stage in range(3):
        for block in range(n):
            x = basic_block(x, width * 2 ** stage, 2 if stage and not block else 1, f"conv{stage + 2}_block{block + 1}",
                            bn_momentum, max_value)
    outputs = classifier_head(x, int(classes), dropout, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}_{h}")
