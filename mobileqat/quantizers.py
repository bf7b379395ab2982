"""Fake quantizers: tfmot ``Quantizer`` objects that emit TF FakeQuant ops.

The TFLite converter turns each FakeQuant op into the scale and zero point of an
integer tensor, so what these quantizers compute in training is what the .tflite holds.
All use TF's nudged min/max arithmetic (``tf.quantization.fake_quant_with_min_max_vars``):
scale = (max - min) / (qmax - qmin), zero point rounded to an integer, straight-through
gradient inside the range and zero outside.

- ``WeightQuantizer``: symmetric, per-channel (last axis) or per-tensor, range = max|w| of
  the current weights (recorded in variables so that inference and export use it). Below 8 bits
  the weights are clipped to max|w| and fake-quantized by an 8-bit FakeQuant whose step is the
  n-bit step (``weight_fake_quant_range``): the same grid as an n-bit FakeQuant, but the converter
  writes an ordinary int8 op whose codes stay in [-(2^(n-1)-1), 2^(n-1)-1]. (From a 3- or 4-bit
  FakeQuant, measured, TF 2.21's converter writes packed INT4 weights with CONV_2D / DEPTHWISE_CONV_2D
  version 7 and FULLY_CONNECTED version 10; the reference kernels have no int4 DEPTHWISE_CONV_2D
  ("Didn't find op for builtin opcode 'DEPTHWISE_CONV_2D' version '7'") and XNNPACK delegates only
  the int4 FULLY_CONNECTED. ``packed_int4=True`` asks for that FakeQuant, and packed INT4, where it
  runs: ``QuantScheme(packed_int4=True)`` gives it to 4-bit Dense layers.)
- ``ActivationQuantizer``: asymmetric, range = exponential moving average of batch min/max,
  started from the first batch (not from an arbitrary +-6), always containing 0.
- ``FixedRangeQuantizer``: a range fixed by the runtime (softmax output: [0, 255/256]).
"""
from mobileqat._tf import keras, tf, tfmot

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer
_serializable = keras.utils.register_keras_serializable(package="mobileqat")


def _check_bits(num_bits):
    if not isinstance(num_bits, int) or not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits={num_bits!r} is not supported: use an integer from 2 to 8.")
    return num_bits


def weight_fake_quant_range(amax, num_bits):
    """The symmetric 8-bit FakeQuant maximum (float32) whose narrow grid has the step of a ``num_bits``
    narrow grid over [-amax, amax]: amax * (127 / (2^(num_bits-1) - 1)), one float32 multiply (so that
    numpy reproduces the graph's float32 value bit for bit). amax itself for 8 bits."""
    import numpy as np
    if num_bits == 8:
        return amax
    factor = np.float32(127.0 / (2 ** (num_bits - 1) - 1))
    if isinstance(amax, (np.ndarray, np.floating, float)):
        return np.float32(amax) * factor
    return amax * tf.constant(factor)


def _smart_cond(pred, true_fn, false_fn):
    return tf.__internal__.smart_cond.smart_cond(pred, true_fn, false_fn)


def fake_quant(x, min_value, max_value, num_bits=8, narrow_range=False, per_channel=False):
    """Quantize-dequantize ``x`` on the grid that TFLite uses; per_channel runs along the last axis."""
    op = (tf.quantization.fake_quant_with_min_max_vars_per_channel if per_channel
          else tf.quantization.fake_quant_with_min_max_vars)
    return op(x, min_value, max_value, num_bits=num_bits, narrow_range=narrow_range)


def _bypassed(inputs, *ranges):
    """``inputs`` unquantized, after the range updates that ``ranges`` depend on (fake quantization off)."""
    with tf.control_dependencies(ranges):
        return tf.identity(inputs)


class _Base(_Quantizer):
    # Training-time switches, set by the schedule callbacks of mobileqat.training while model.fit runs and read
    # when the train function is traced (never saved): ``bypass`` returns the input unquantized (ranges are still
    # recorded), ``train_bits`` (WeightQuantizer) quantizes weights on another bit width's grid than ``num_bits``.
    bypass = False
    train_bits = None

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@_serializable
class WeightQuantizer(_Base):
    """Symmetric weight quantizer; per-channel along the last axis (output channels).

    Args:
      num_bits: 2..8. With narrow_range the integer grid is [-(2^(b-1)-1), 2^(b-1)-1], zero point 0.
      per_channel: one scale per output channel (last axis of the tensor it is given).
      narrow_range: TFLite requires it for int8 weights.
      packed_int4: num_bits == 4 only: a 4-bit FakeQuant, which the converter writes as packed INT4
        weights (two codes a byte); for Dense layers (FULLY_CONNECTED, which the reference kernels and
        XNNPACK run with int4 weights). Otherwise weights below 8 bits are int8 tensors on the n-bit grid.
    """

    def __init__(self, num_bits=8, per_channel=True, narrow_range=True, packed_int4=False):
        self.num_bits = _check_bits(num_bits)
        self.packed_int4 = bool(packed_int4)
        if self.packed_int4 and self.num_bits != 4:  # 2 bits measured: the file is 1 LSB off the twin
            raise ValueError(f"WeightQuantizer(num_bits={num_bits}, packed_int4=True): packed INT4 is written and "
                             "lowered for 4-bit weights only; use num_bits=4 or packed_int4=False.")
        if self.num_bits < 8 and not narrow_range:
            raise ValueError(f"WeightQuantizer(num_bits={num_bits}, narrow_range=False): weights below 8 bits "
                             "use the narrow symmetric grid (TFLite's int8 weights are narrow): drop "
                             "narrow_range=False.")
        self.per_channel = bool(per_channel)
        self.narrow_range = bool(narrow_range)

    def build(self, tensor_shape, name, layer):
        shape = (int(tensor_shape[-1]),) if self.per_channel else ()
        init = keras.initializers.Constant(1.0)
        return {
            "max_var": layer.add_weight(name + "_max", shape=shape, initializer=init, trainable=False),
        }

    def __call__(self, inputs, training, weights, **kwargs):
        max_var = weights["max_var"]

        def record_range():
            axes = list(range(inputs.shape.rank - 1)) if self.per_channel else None
            amax = tf.reduce_max(tf.abs(inputs), axis=axes)
            amax = tf.maximum(amax, 1e-8)  # a degenerate scale cannot be prepared by TFLite
            return max_var.assign(amax)

        amax = _smart_cond(training, record_range, lambda: tf.identity(max_var))
        if self.bypass:
            return _bypassed(inputs, amax)
        bits = self.train_bits or self.num_bits
        if bits < 8 and not (self.packed_int4 and bits == 4):  # the n-bit grid inside the int8 grid (module docstring)
            inputs = tf.clip_by_value(inputs, -amax, amax)
            top = weight_fake_quant_range(amax, bits)
            return fake_quant(inputs, -top, top, 8, True, self.per_channel)
        if self.narrow_range:
            amin = -amax
        else:  # two's complement: the grid reaches one more step below zero
            levels = 2 ** bits
            amin = -amax * (levels / (levels - 2))
        return fake_quant(inputs, amin, amax, bits, self.narrow_range, self.per_channel)

    def get_config(self):
        config = {"num_bits": self.num_bits, "per_channel": self.per_channel, "narrow_range": self.narrow_range}
        if self.packed_int4:
            config["packed_int4"] = True
        return config


# The narrowest activation range written (scale ~ MIN_RANGE / 255). A dead ReLU branch (a squeeze-excite
# reduce conv after a short fine-tune) measured ranges of 1.5e-6: XNNPACK then refused the next CONV_2D
# (requantization scale input * filter / output above 256: "failed to prepare"). 1e-3 is far below any
# range that carries signal and keeps every such ratio in XNNPACK's bounds.
MIN_RANGE = 1e-3


@_serializable
class ActivationQuantizer(_Base):
    """Asymmetric activation quantizer with an EMA range started from the first batch.

    Args:
      num_bits: 2..8 (8 gives int8, zero point in [-128, 127]).
      ema_decay: weight of the old range in each update, 0 <= decay < 1. 0.99 follows
        the data within a few hundred steps, which suits short fine-tuning runs.
    """

    def __init__(self, num_bits=8, ema_decay=0.99):
        self.num_bits = _check_bits(num_bits)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} must lie in [0, 1).")
        self.ema_decay = float(ema_decay)

    def build(self, tensor_shape, name, layer):
        zeros, ones = keras.initializers.Constant(0.0), keras.initializers.Constant(1.0)
        return {
            "min_var": layer.add_weight(name + "_min", shape=(), initializer=zeros, trainable=False),
            "max_var": layer.add_weight(name + "_max", shape=(), initializer=ones, trainable=False),
            "seen_var": layer.add_weight(name + "_seen", shape=(), initializer=zeros, trainable=False),
        }

    def __call__(self, inputs, training, weights, **kwargs):
        min_var, max_var, seen = weights["min_var"], weights["max_var"], weights["seen_var"]

        def update_range():
            batch_min = tf.minimum(tf.reduce_min(inputs), 0.0)
            batch_max = tf.maximum(tf.reduce_max(inputs), 0.0)
            decay = self.ema_decay * seen  # 0 on the first batch: start from the data
            new_min = min_var.assign(decay * min_var + (1.0 - decay) * batch_min)
            new_max = max_var.assign(decay * max_var + (1.0 - decay) * batch_max)
            with tf.control_dependencies([seen.assign(1.0)]):
                return tf.identity(new_min), tf.identity(new_max)

        amin, amax = _smart_cond(training, update_range, lambda: (tf.identity(min_var), tf.identity(max_var)))
        amax = tf.maximum(amax, amin + MIN_RANGE)  # a degenerate scale cannot be prepared by TFLite
        if self.bypass:
            return _bypassed(inputs, amin, amax)
        return fake_quant(inputs, amin, amax, self.num_bits)

    def get_config(self):
        return {"num_bits": self.num_bits, "ema_decay": self.ema_decay}


@_serializable
class FixedRangeQuantizer(_Base):
    """A range the runtime fixes, e.g. softmax int8 output: scale 1/256, zero point -128."""

    def __init__(self, min_value=0.0, max_value=255.0 / 256.0, num_bits=8):
        if not min_value <= 0.0 <= max_value or min_value == max_value:
            raise ValueError(f"range [{min_value}, {max_value}] must contain 0 and not be empty.")
        self.min_value, self.max_value = float(min_value), float(max_value)
        self.num_bits = _check_bits(num_bits)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        if self.bypass:
            return tf.identity(inputs)
        return tf.quantization.fake_quant_with_min_max_args(
            inputs, min=self.min_value, max=self.max_value, num_bits=self.num_bits)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "num_bits": self.num_bits}
