"""QAT layers and QuantizeConfigs.

``FoldedConvBN`` is a Conv2D or DepthwiseConv2D (no bias) with its BatchNormalization and
activation folded in, the way the TFLite converter folds them:

    inference:  y = act(conv(x, Q(w * g / s)) + (beta - mean * g / s)),  s = sqrt(moving_var + eps)

so the weights fake-quantized in training are exactly the folded weights the .tflite holds.
In training, batch statistics normalise the output (the correction of Krishnamoorthi 2018,
sec. 3.2): y = conv(x, Q(w * g / s)) * s / s_B + (beta - mean_B * g / s_B), while the
quantized weights stay folded with the moving statistics, so training and inference
quantize the same tensor.

``folding="single_conv"`` trains with one convolution instead of two (PyTorch's fused QAT ConvBn,
``torch/ao/nn/intrinsic/qat/modules/conv_fused.py``, ``_forward_approximate``): z = conv(x, Q(w * g / s)) / (g / s)
is normalised by its own batch statistics, y = (z - mean_B(z)) * g / s_B(z) + beta. The weights quantized are the
same folded tensor; the statistics are those of the quantized-weight convolution (an approximation of the float
ones). ``folding="two_pass"`` (the default) is the form above, exact batch statistics at the cost of a second
convolution.

With ``batch_statistics=False`` training uses the moving statistics too (they stay fixed): a frozen
BatchNormalization (``trainable=False``, as in transfer learning), or a fixed per-channel scale and
offset that a rewrite expressed as a 1x1 depthwise FoldedConvBN (Rescaling, Normalization).

The QuantizeConfigs say which tensors of a layer are fake-quantized (tfmot's contract).
"""
from mobileqat._tf import keras, tf, tfmot
from mobileqat import quantizers
from mobileqat.quantizers import (MIN_RANGE, ActivationQuantizer, FixedRangeQuantizer, SymmetricActivationQuantizer,
                                  WeightQuantizer)

_serializable = keras.utils.register_keras_serializable(package="mobileqat")
_QuantizeConfig = tfmot.quantization.keras.QuantizeConfig


FOLDINGS = ("two_pass", "single_conv")


@_serializable
class FoldedConvBN(keras.layers.Layer):
    """Conv2D / DepthwiseConv2D + BatchNormalization (+ activation) with BN folded into the weights.

    Input (batch, H, W, C_in) float32; output (batch, H', W', C_out) with C_out = filters, or
    C_in * depth_multiplier when ``depthwise``. The weight quantizer sees the folded kernel with
    output channels on the last axis, (kh, kw, C_in / groups, C_out) or (kh, kw, 1, C_in * multiplier).

    ``groups`` (Conv2D only) splits the input channels into that many groups, each convolved by
    C_out / groups filters, as Conv2D(groups=...) does; the converter writes one CONV_2D whose filter
    has C_in / groups input channels (RegNet's 3x3 convolutions).
    """

    def __init__(self, filters=None, kernel_size=3, strides=1, padding="same", depthwise=False,
                 depth_multiplier=1, activation=None, momentum=0.9, epsilon=1e-3,
                 weight_quantizer=None, kernel_initializer="he_normal", kernel_regularizer=None,
                 batch_statistics=True, groups=1, folding="two_pass", **kwargs):
        super().__init__(**kwargs)
        if folding not in FOLDINGS:
            raise ValueError(f"FoldedConvBN '{self.name}': folding={folding!r}; use one of {FOLDINGS}.")
        self.folding = folding
        if not depthwise and not filters:
            raise ValueError(f"FoldedConvBN '{self.name}': give filters (a positive integer) or depthwise=True.")
        self.groups = int(groups or 1)
        if self.groups < 1 or (depthwise and self.groups != 1):
            raise ValueError(f"FoldedConvBN '{self.name}': groups={groups}; use a positive integer, and groups=1 "
                             "with depthwise=True (a depthwise convolution is grouped by definition).")
        if not depthwise and int(filters) % self.groups:
            raise ValueError(f"FoldedConvBN '{self.name}': filters={filters} is not divisible by "
                             f"groups={self.groups}; each group needs the same number of filters.")
        self.filters = filters
        self.kernel_size = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) else (kernel_size,) * 2
        self.strides = tuple(strides) if isinstance(strides, (list, tuple)) else (strides,) * 2
        self.padding = padding.lower()
        self.depthwise = bool(depthwise)
        self.depth_multiplier = int(depth_multiplier)
        self.activation = keras.activations.get(activation)
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        if isinstance(weight_quantizer, dict):
            weight_quantizer = _deserialize(weight_quantizer)
        self.weight_quantizer = weight_quantizer
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.batch_statistics = bool(batch_statistics)

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        kh, kw = self.kernel_size
        if self.depthwise:
            self.out_channels = c_in * self.depth_multiplier
            kernel_shape = (kh, kw, c_in, self.depth_multiplier)
            self._quant_shape = (kh, kw, 1, self.out_channels)
        else:
            if c_in % self.groups:
                raise ValueError(f"FoldedConvBN '{self.name}': the input has {c_in} channels, not divisible by "
                                 f"groups={self.groups}; use a number of groups that divides the input channels.")
            self.out_channels = int(self.filters)
            kernel_shape = self._quant_shape = (kh, kw, c_in // self.groups, self.out_channels)
        self.kernel = self.add_weight("kernel", kernel_shape, initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer)
        n = (self.out_channels,)
        self.gamma = self.add_weight("gamma", n, initializer="ones")
        self.beta = self.add_weight("beta", n, initializer="zeros")
        self.moving_mean = self.add_weight("moving_mean", n, initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight("moving_variance", n, initializer="ones", trainable=False)
        self._wq_vars = (self.weight_quantizer.build(self._quant_shape, "kernel", self)
                         if self.weight_quantizer is not None else None)
        super().build(input_shape)

    def load_conv_bn(self, kernel, gamma, beta, moving_mean, moving_variance):
        """Take the weights of a Conv2D/DepthwiseConv2D (no bias) and its BatchNormalization."""
        for var, value in zip((self.kernel, self.gamma, self.beta, self.moving_mean, self.moving_variance),
                              (kernel, gamma, beta, moving_mean, moving_variance)):
            var.assign(tf.reshape(tf.cast(value, var.dtype), var.shape))
        if self.weight_quantizer is not None:  # range of the folded weights, as export will see them
            self.folded_kernel(training=True)

    def _conv(self, x, kernel):
        strides = (1,) + self.strides + (1,)
        if self.depthwise:
            return tf.nn.depthwise_conv2d(x, kernel, strides, self.padding.upper())
        if self.groups != 1:  # TensorFlow's CPU kernels have no gradient for grouped convolutions; XLA has
            return _grouped_conv2d(x, kernel, strides, self.padding.upper())
        return tf.nn.conv2d(x, kernel, strides, self.padding.upper())

    def folded_float_kernel(self):
        """w * gamma / sqrt(moving_var + eps) before quantization, output channels last:
        (kh, kw, C_in, C_out), or (kh, kw, 1, C) for depthwise."""
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        return tf.reshape(self.kernel, self._quant_shape) * scale

    def folded_kernel(self, training=False):
        """The kernel the .tflite holds: w * gamma / sqrt(moving_var + eps), fake-quantized."""
        w = self.folded_float_kernel()
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w, training, self._wq_vars)
        return tf.reshape(w, self.kernel.shape)

    def folded_bias(self):
        """The bias the .tflite holds (before int32 quantization): beta - mean * gamma / s, shape (C_out,)."""
        return self.beta - self.moving_mean * self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)

    def call(self, inputs, training=None):
        if training is None:
            training = keras.backend.learning_phase()
        train = (self._fixed_statistics_step if not self.batch_statistics else
                 self._single_conv_step if self.folding == "single_conv" else self._train_step)
        return tf.__internal__.smart_cond.smart_cond(training, lambda: train(inputs), lambda: self._infer(inputs))

    def _infer(self, inputs, training=False):
        y = self._conv(inputs, self.folded_kernel(training=training)) + self.folded_bias()
        return self.activation(y)

    def _fixed_statistics_step(self, inputs):
        return self._infer(inputs, training=True)  # moving statistics; the weight range still updates

    def _train_step(self, inputs):
        # Batch statistics of the float conv (as BatchNormalization computes them).
        mean, var = tf.nn.moments(self._conv(inputs, self.kernel), axes=[0, 1, 2])
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * tf.stop_gradient(mean))
        self.moving_variance.assign(m * self.moving_variance + (1.0 - m) * tf.stop_gradient(var))
        inv_moving = tf.math.rsqrt(self.moving_variance + self.epsilon)
        inv_batch = tf.math.rsqrt(var + self.epsilon)
        y = self._conv(inputs, self.folded_kernel(training=True))
        y = y * (inv_batch / inv_moving) + (self.beta - mean * self.gamma * inv_batch)
        return self.activation(y)

    def _single_conv_step(self, inputs):
        # One convolution with the quantized folded kernel, unscaled back to conv(x, w) units, then batch norm
        # with the batch statistics of that output (PyTorch's _forward_approximate).
        scale = self.gamma * tf.math.rsqrt(self.moving_variance + self.epsilon)
        safe = tf.where(tf.equal(scale, 0.0), tf.ones_like(scale), scale)  # gamma = 0: that channel is beta
        z = self._conv(inputs, self.folded_kernel(training=True)) / safe
        mean, var = tf.nn.moments(z, axes=[0, 1, 2])
        m = self.momentum
        self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * tf.stop_gradient(mean))
        self.moving_variance.assign(m * self.moving_variance + (1.0 - m) * tf.stop_gradient(var))
        y = (z - mean) * (self.gamma * tf.math.rsqrt(var + self.epsilon)) + self.beta
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        if not self.built:
            self.build(input_shape)
        n, h, w = input_shape[0], input_shape[1], input_shape[2]
        out = []
        for size, k, s in zip((h, w), self.kernel_size, self.strides):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append(-(-(size - k + 1) // s))
        return tf.TensorShape([n, out[0], out[1], self.out_channels])

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, padding=self.padding,
            depthwise=self.depthwise, depth_multiplier=self.depth_multiplier,
            activation=keras.activations.serialize(self.activation), momentum=self.momentum,
            epsilon=self.epsilon,
            weight_quantizer=(keras.utils.serialize_keras_object(self.weight_quantizer)
                              if self.weight_quantizer is not None else None),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer)
            if self.kernel_regularizer is not None else None,
            batch_statistics=self.batch_statistics, groups=self.groups, folding=self.folding,
        )
        return config


@tf.function(jit_compile=True)
def _grouped_conv2d(x, kernel, strides, padding):
    """tf.nn.conv2d with a kernel of C_in / groups input channels, compiled by XLA (as tf_keras' Conv2D
    does for groups > 1): TensorFlow's CPU kernels compute it forward but not its gradients."""
    return tf.nn.conv2d(x, kernel, strides, padding)


def _serialize(q):
    return keras.utils.serialize_keras_object(q) if q is not None else None


_QUANTIZERS = {c.__name__: c for c in quantizers.ALL}


def _deserialize(q):
    # by class name too: the legacy (.h5) loader looks up 'WeightQuantizer', not the registered 'mobileqat>...'
    return keras.utils.deserialize_keras_object(q, custom_objects=_QUANTIZERS) if isinstance(q, dict) else q


@_serializable
class QuantizeConfig(_QuantizeConfig):
    """Which tensors of one layer are fake-quantized.

    Args:
      weight_attrs: names of the layer's weight attributes to quantize (e.g. ["kernel"]).
      weight_quantizer: quantizer for those weights (output channels on the last axis).
      output_quantizer: quantizer for the layer's output, or None when the layer only moves
        integers (MaxPool, Reshape, Dropout) and keeps its input's scale.
    """

    def __init__(self, weight_attrs=(), weight_quantizer=None, output_quantizer=None):
        self.weight_attrs = list(weight_attrs)
        self.weight_quantizer = _deserialize(weight_quantizer)
        self.output_quantizer = _deserialize(output_quantizer)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, a), self.weight_quantizer) for a in self.weight_attrs]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        for attr, w in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, w)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self):
        return {"weight_attrs": self.weight_attrs, "weight_quantizer": _serialize(self.weight_quantizer),
                "output_quantizer": _serialize(self.output_quantizer)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return isinstance(other, QuantizeConfig) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other


def default_weight_quantizer():
    return WeightQuantizer(8, per_channel=True, narrow_range=True)


def default_activation_quantizer():
    return ActivationQuantizer(8)



@_serializable
class HardSwish(keras.layers.Layer):
    """hard_swish(x) = x * relu6(x + 3) / 6 in one layer (MobileNetV3's activation).

    tf_keras' MobileNetV3 writes it as Multiply()([x, ReLU(6.)(x + 3.) * (1. / 6.)]), three layers and
    two TensorFlow ops; ``transforms.hard_activations`` turns that pattern into this layer. With one
    fake-quant at its output the converter writes it as one int8 HARD_SWISH op."""

    def call(self, inputs):
        return inputs * tf.nn.relu6(inputs + 3.0) * (1.0 / 6.0)


@_serializable
class HardSigmoid(keras.layers.Layer):
    """hard_sigmoid(x) = relu6(x + 3) / 6 in one layer (MobileNetV3's squeeze-excite gate).

    tf_keras' MobileNetV3 writes it as ReLU(6.)(x + 3.) * (1. / 6.); ``transforms.hard_activations``
    turns that pattern into this layer. TFLite has no hard-sigmoid op: in a QAT model
    (``HardSigmoidQuantizeConfig``) relu6(x + 3) is fake-quantized on its fixed range ``RELU6_RANGE``
    and the converter writes two int8 ops, ADD(x, 3) with a fused RELU6 and MUL(., 1/6)."""

    RELU6_RANGE = (0.0, 6.0)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.relu6_quantizer = None  # set by HardSigmoidQuantizeConfig in a QAT model

    def call(self, inputs, training=None):
        y = tf.nn.relu6(inputs + 3.0)
        if self.relu6_quantizer is not None:
            y = self.relu6_quantizer(y, training, {})
        return y * (1.0 / 6.0)


@_serializable
class HardSigmoidQuantizeConfig(QuantizeConfig):
    """``QuantizeConfig`` of a ``HardSigmoid``: its output quantizer, and relu6(x + 3) fake-quantized on
    [0, 6] inside the layer, so that the converter writes ADD + MUL in int8 (without it both stay float)."""

    def set_quantize_activations(self, layer, quantize_activations):
        layer.relu6_quantizer = FixedRangeQuantizer(*HardSigmoid.RELU6_RANGE)


@_serializable
class LayerNormCore(keras.layers.Layer):
    """LayerNormalization over the last axis without its scale and offset, as explicit int8-able ops:

        mean = mean(x, -1)            MEAN        (N, ..., 1)
        d    = x - mean               SUB         (N, ..., C)
        sq   = d * d                  MUL         (N, ..., C)
        var  = mean(sq, -1)           MEAN        (N, ..., 1)
        r    = rsqrt(var + epsilon)   RSQRT       (N, ..., 1)
        y    = d * r                  MUL         (N, ..., C)

    ``transforms.layer_norm_to_core`` writes a LayerNormalization as this layer, its gamma and beta folded
    into the Dense/Conv2D after it (or a 1x1 DepthwiseConv2D, one int8 DEPTHWISE_CONV_2D). In a QAT model
    (``LayerNormQuantizeConfig``) mean, d, sq, var and r are fake-quantized, each on its own EMA range
    (``ActivationQuantizer``), y by the wrapper's output quantizer: the converter writes the six ops in int8.
    There epsilon is dropped: var is on an int8 grid whose step is far above any epsilon (an int8 ADD of
    it would not change a code), and the int8 RSQRT maps var = 0 to its largest output code, as
    fake-quantizing rsqrt(0) = inf does. In training rsqrt's input is floored at one step of var's grid
    (a finite gradient; the same clamped output). While a quantization delay bypasses the quantizers,
    epsilon is back (the float layer's function, ranges still recorded). The range variables exist in the
    float layer too (unused there), so that a float model and its QAT copy hold the same weights.
    """

    INTERMEDIATES = ("mean", "centered", "square", "variance", "rsqrt")

    def __init__(self, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        self.quantized = False  # set by LayerNormQuantizeConfig in a QAT model
        self._quantizer = ActivationQuantizer(8)

    def build(self, input_shape):
        self._qvars = {n: self._quantizer.build((), n, self) for n in self.INTERMEDIATES}
        super().build(input_shape)

    def call(self, inputs, training=None):
        mean = tf.reduce_mean(inputs, axis=-1, keepdims=True)
        if not self.quantized:
            d = inputs - mean
            return d * tf.math.rsqrt(tf.reduce_mean(d * d, axis=-1, keepdims=True) + self.epsilon)
        if training is None:
            training = keras.backend.learning_phase()

        def fq(name, t):
            return self._quantizer(t, training, self._qvars[name])

        d = fq("centered", inputs - fq("mean", mean))
        var = fq("variance", tf.reduce_mean(fq("square", d * d), axis=-1, keepdims=True))

        def floored():  # one step of var's grid (its range starts at 0)
            v = self._qvars["variance"]
            step = tf.stop_gradient(tf.maximum(v["max_var"], v["min_var"] + MIN_RANGE) - v["min_var"]) / 255.0
            return tf.math.rsqrt(tf.maximum(var, step))

        if self._quantizer.bypass:  # quantization delay: the float layer's function, ranges still recorded
            return d * fq("rsqrt", tf.math.rsqrt(var + self.epsilon))
        r = tf.__internal__.smart_cond.smart_cond(training, floored, lambda: tf.math.rsqrt(var))
        return d * fq("rsqrt", r)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


@_serializable
class LayerNormQuantizeConfig(QuantizeConfig):
    """``QuantizeConfig`` of a ``LayerNormCore``: its output quantizer, and the layer's intermediate tensors
    fake-quantized on their own EMA ranges (variables of the layer), so that the converter writes every op
    in int8."""

    def set_quantize_activations(self, layer, quantize_activations):
        layer.quantized = True


@_serializable
class ConstantShapeReshape(keras.layers.Reshape):
    """Keras' Reshape with the batch written as -1: (N, ...) -> (N, *target_shape), no -1 in target_shape.

    Keras' Reshape builds its shape from tf.shape(x)[0], which the converter writes as SHAPE, STRIDED_SLICE
    and PACK ops in front of the RESHAPE; XNNPACK takes none of them, so the graph splits there. This layer
    gives the converter a constant shape: one RESHAPE, which XNNPACK takes (``transforms.constant_shape_reshapes``)."""

    def __init__(self, target_shape, **kwargs):
        if any(d is None or int(d) < 1 for d in target_shape):
            raise ValueError(f"ConstantShapeReshape: target_shape={tuple(target_shape)!r} must be positive sizes "
                             "(the batch is the only unknown dimension); use keras.layers.Reshape for -1.")
        super().__init__(tuple(int(d) for d in target_shape), **kwargs)

    def call(self, inputs):
        return tf.reshape(inputs, (-1,) + self.target_shape)
