"""MobileNetV1 (Howard et al. 2017, https://arxiv.org/abs/1704.04861), built for int8 QAT."""
from mobileqat._tf import keras
from mobileqat.architectures._blocks import (check_args, check_input_shape, classifier_head, conv_bn_relu6,
                                             depthwise_bn_relu6, stem_stride)

# (pointwise filters, depthwise stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def mobilenet_v1(input_shape=(32, 32, 3), classes=10, alpha=1.0, depth_multiplier=1, dropout=1e-3,
                 classifier_activation="softmax", bn_momentum=0.9, name=None):
    """MobileNetV1 classifier: (N, H, W, C) images -> (N, classes).

    Stem conv 3x3 (``int(32 * alpha)`` filters) then 13 depthwise-separable blocks
    (depthwise 3x3 -> pointwise 1x1 with ``int(c * alpha)`` filters), all Conv -> BN -> ReLU6
    with no bias and "same" padding; head GAP -> Dropout -> Dense ``logits`` (linear) ->
    Activation ``predictions``. The backbone matches ``keras.applications.MobileNet``
    (same weights), minus its ZeroPadding2D layers.

    Stem stride: 2 when min(H, W) >= 96 (ImageNet schedule, total stride 32, 224 -> 7x7
    features); 1 for smaller images (total stride 16, 32x32 -> 2x2 features).

    Args:
      input_shape: (H, W, C), H and W >= 32, C in (1, 3).
      classes: number of classes, >= 2.
      alpha: width multiplier (> 0).
      depth_multiplier: channel multiplier of the depthwise convs.
      dropout: dropout rate before the Dense layer (0 drops the layer).
      classifier_activation: activation of the ``predictions`` layer; None returns logits.
      bn_momentum: BatchNormalization momentum.
      name: model name, default ``mobilenet_v1_{alpha:.2f}_{H}``.
    Returns:
      A functional ``keras.Model``.
    """
    h, w, c = check_input_shape(input_shape)
    check_args(alpha, classes, dropout)
    if int(depth_multiplier) != depth_multiplier or depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be an int >= 1, got {depth_multiplier!r}.")

    inputs = keras.Input((h, w, c), name="input")
    x = conv_bn_relu6(inputs, int(32 * alpha), 3, stem_stride((h, w)), "conv1", bn_momentum)
    for i, (filters, strides) in enumerate(BLOCKS, start=1):
        x = depthwise_bn_relu6(x, strides, f"conv_dw_{i}", bn_momentum, depth_multiplier=int(depth_multiplier))
        x = conv_bn_relu6(x, int(filters * alpha), 1, 1, f"conv_pw_{i}", bn_momentum)
    outputs = classifier_head(x, int(classes), dropout, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"mobilenet_v1_{alpha:0.2f}_{h}")
