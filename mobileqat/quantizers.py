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
- Learned (trainable) ranges, each with its paper's gradients (``tf.custom_gradient``) around the same FakeQuant op:
  ``LSQWeightQuantizer`` (learned step size, Esser et al. 2020), ``LSQActivationQuantizer`` (learned step and
  offset, LSQ+), ``PACTQuantizer`` (learned clipping level of ReLU outputs, Choi et al. 2018).
"""
import types

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
      fixed_range: keep the range in ``max_var`` (set by ``mobileqat.calibration``, possibly clipping)
        instead of recording max|w| on every training step; weights beyond it are clipped.
    """

    def __init__(self, num_bits=8, per_channel=True, narrow_range=True, packed_int4=False, fixed_range=False):
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
        self.fixed_range = bool(fixed_range)

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

        if self.fixed_range:
            amax = tf.identity(max_var)  # weights beyond it are clipped (by the FakeQuant, or below)
        else:
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
        if self.fixed_range:
            config["fixed_range"] = True
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

    def ema_range(self, inputs, training, weights):
        """(min, max) tensors: in training the moving average updated with this batch (started from the first
        batch), else the stored one."""
        min_var, max_var, seen = weights["min_var"], weights["max_var"], weights["seen_var"]

        def update_range():
            batch_min = tf.minimum(tf.reduce_min(inputs), 0.0)
            batch_max = tf.maximum(tf.reduce_max(inputs), 0.0)
            decay = self.ema_decay * seen  # 0 on the first batch: start from the data
            new_min = min_var.assign(decay * min_var + (1.0 - decay) * batch_min)
            new_max = max_var.assign(decay * max_var + (1.0 - decay) * batch_max)
            with tf.control_dependencies([seen.assign(1.0)]):
                return tf.identity(new_min), tf.identity(new_max)

        return _smart_cond(training, update_range, lambda: (tf.identity(min_var), tf.identity(max_var)))

    def __call__(self, inputs, training, weights, **kwargs):
        amin, amax = self.ema_range(inputs, training, weights)
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
        self.num_bits = 16 if num_bits == 16 else _check_bits(num_bits)  # 16: int16x8 fixed ranges

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        if self.bypass:
            return tf.identity(inputs)
        return tf.quantization.fake_quant_with_min_max_args(
            inputs, min=self.min_value, max=self.max_value, num_bits=self.num_bits)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value, "num_bits": self.num_bits}


@_serializable
class SymmetricActivationQuantizer(_Base):
    """16-bit symmetric activation quantizer (TFLite int16x8: int16 activations need zero point 0).

    Range [-m, m], m = max(|min|, |max|) of an exponential moving average of batch min/max (started from
    the first batch, as ``ActivationQuantizer``), at least ``MIN_RANGE``; a 16-bit narrow FakeQuant, so the
    converter writes int16 codes in [-32767, 32767], scale m / 32767, zero point 0.

    Args:
      num_bits: 16 (the only width TFLite runs with zero-point-0 integer activations besides int8).
      ema_decay: weight of the old range in each update, 0 <= decay < 1.
    """

    def __init__(self, num_bits=16, ema_decay=0.99):
        if num_bits != 16:
            raise ValueError(f"SymmetricActivationQuantizer(num_bits={num_bits!r}): only 16 (int16x8) is "
                             "supported; use ActivationQuantizer for 8-bit activations.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} must lie in [0, 1).")
        self.num_bits, self.ema_decay = 16, float(ema_decay)

    build = ActivationQuantizer.build
    ema_range = ActivationQuantizer.ema_range

    def __call__(self, inputs, training, weights, **kwargs):
        amin, amax = self.ema_range(inputs, training, weights)
        m = tf.maximum(tf.maximum(-amin, amax), MIN_RANGE)
        if self.bypass:
            return _bypassed(inputs, m)
        return fake_quant(inputs, -m, m, 16, narrow_range=True)

    def get_config(self):
        return {"num_bits": self.num_bits, "ema_decay": self.ema_decay}


def symmetric_range(min_value, max_value):
    """float32 m of ``SymmetricActivationQuantizer``'s range [-m, m] from its variables, as the graph computes it."""
    import numpy as np
    return np.float32(max(max(-np.float32(min_value), np.float32(max_value)), np.float32(MIN_RANGE)))
# --- Learned quantizers: LSQ (Esser et al. 2020), LSQ+ offset (Bhalgat et al. 2020), PACT (Choi et al. 2018) ---
#
# Each emits the same TF FakeQuant op as the min-max quantizers (so that the converter writes the learned scale
# into the file), with min/max derived from the learned parameters, wrapped in ``tf.custom_gradient`` so that
# training sees the paper's gradients instead of FakeQuant's. ``fake_quant_range(qvars)`` gives, in numpy float32
# (the same float32 operations as the graph), the min/max of that FakeQuant: ``mobileqat.lower`` reads it, and the
# converter's scale follows from it as for any FakeQuant (``lowering.quantization_params``).

MIN_WEIGHT_STEP = 1e-10  # floor of a learned weight step: a dead channel (all zeros) still gets a preparable scale


def _owner(layer):
    """Where a learned quantizer keeps its variables: the layer a tfmot QuantizeWrapper wraps, else ``layer``.
    tfmot's QuantizeWrapperV2 orders its trainable weights by whether the inner layer was built before the
    wrapper (yes after ``quantize``, no when a saved model is loaded), so trainable variables of the wrapper's
    own would come first in one case and last in the other, and .h5 weights would load into the wrong
    variables; held by the inner layer they keep one order."""
    inner = getattr(layer, "layer", None)
    return inner if inner is not None and hasattr(layer, "quantize_config") else layer


def _variables(**variables):
    """The variables a learned quantizer's ``build`` returns, by attribute (``qvars.step``). Not a dict: tfmot stores
    what ``build`` returns on its wrapper, and Keras would track the variables of a dict there as the wrapper's own
    (see ``_owner``); a namespace is opaque to that tracking."""
    return types.SimpleNamespace(**variables)


def _learned_weight(layer, name, shape, init, trainable, regularizer=None):
    # MEAN aggregation: a variable assigned in call (the data initialisation) under a tf.distribute strategy
    return _owner(layer).add_weight(name, shape=shape, initializer=keras.initializers.Constant(init), trainable=trainable,
                            regularizer=regularizer, aggregation=tf.VariableAggregation.MEAN)


def _flag(layer, name):
    """0 until the quantizer has been initialised from the data, then 1."""
    return _owner(layer).add_weight(name, shape=(), trainable=False, initializer=keras.initializers.Constant(0.0))


def _init_once(training, flag, init_fn):
    """In training, run ``init_fn`` (assignments from the data) on the first call only (``flag`` 0 -> 1).
    Returns a tensor to depend on."""
    def first():
        with tf.control_dependencies(init_fn()):
            with tf.control_dependencies([flag.assign(1.0)]):
                return tf.constant(1.0)
    return _smart_cond(training, lambda: tf.cond(flag > 0.5, lambda: tf.constant(0.0), first),
                       lambda: tf.constant(0.0))


@_serializable
class LSQWeightQuantizer(_Base):
    """LSQ weight quantizer: a learned step size s, per output channel (last axis) or per tensor.

    Forward: w_q = s * clip(round(w / s), -Qp, Qp), Qp = 2^(b-1) - 1 (narrow symmetric grid, zero point 0),
    emitted as an 8-bit narrow FakeQuant on [-127 s, 127 s] after a clip to [-Qp s, Qp s] (below 8 bits the
    file holds int8 tensors on the b-bit grid, as ``WeightQuantizer``), or, with ``packed_int4``, a 4-bit
    FakeQuant on [-7 s, 7 s] (packed INT4 Dense).
    The file's scale is fl32(fl32(127 s) / 127) (fl32(fl32(7 s) / 7) packed): the converter and TF's FakeQuant
    both divide the float32 range back by the grid size. It equals s bit for bit for most s and is otherwise one
    float32 ulp away (relative 6e-8); ``steps(qvars)`` gives it.
    Gradients (paper, eq. 3 and 4): w gets the straight-through estimate inside [-Qp s, Qp s] and 0 outside; s gets
    g * sum(dy * (round(w/s) - w/s)) inside, -Qp below, +Qp above, with g = 1 / sqrt(N * Qp), N the number of
    weights sharing the step (per channel: kh * kw * C_in).
    Initialisation (``init``), from the weights at the first training-mode call (for a folded conv + BN: when
    ``quantize`` loads the folded weights; for Conv2D/Dense: ``quantize`` calls ``initialize``):
    "max" (default): s = max|w| / Qp, the min-max grid (no weight clipped), where min-max QAT starts;
    "paper": s = 2 mean|w| / sqrt(Qp) (per channel). With few weights per channel (a depthwise 3x3 has 9) the
    paper's step puts Qp s at 2 to 3 times max|w| at 4 bits, so the weights start on a 3-bit grid, and a short
    fine-tune does not move it back: measured 3 to 17 points below "max" at W4A8 (models/README.md).
    The step used is |step| (at least ``MIN_WEIGHT_STEP``): under Adam a small step can be pushed through 0 in one
    update, and a floor alone would leave it there with no gradient (a dead channel); |step| keeps the gradient.
    Variables: ``step`` (trainable), ``initialized`` (0/1).
    """

    INITS = ("max", "paper")

    def __init__(self, num_bits=8, per_channel=True, packed_int4=False, init="max"):
        if init not in self.INITS:
            raise ValueError(f"LSQWeightQuantizer(init={init!r}): use one of {list(self.INITS)} (max: max|w| / Qp; "
                             "paper: 2 mean|w| / sqrt(Qp)).")
        self.init = init
        self.num_bits = _check_bits(num_bits)
        self.per_channel = bool(per_channel)
        self.packed_int4 = bool(packed_int4)
        if self.packed_int4 and self.num_bits != 4:
            raise ValueError(f"LSQWeightQuantizer(num_bits={num_bits}, packed_int4=True): packed INT4 is written and "
                             "lowered for 4-bit weights only; use num_bits=4 or packed_int4=False.")
        self.narrow_range = True
        self.qp = 2 ** (self.num_bits - 1) - 1

    @property
    def _fq_top(self):
        """Grid end of the FakeQuant emitted: 127 (8-bit FakeQuant), or 7 (4-bit, packed)."""
        return self.qp if self.packed_int4 else 127

    def build(self, tensor_shape, name, layer):
        shape = (int(tensor_shape[-1]),) if self.per_channel else ()
        return _variables(step=_learned_weight(layer, name + "_lsq_step", shape, 1.0 / self.qp, True),
                          initialized=_flag(layer, name + "_lsq_initialized"))

    def _axes(self, rank):
        return list(range(rank - 1)) if self.per_channel else None

    def initial_step(self, w):
        """Per channel or per tensor: max|w| / Qp (init "max") or 2 mean|w| / sqrt(Qp) (init "paper")."""
        if self.init == "max":
            return tf.maximum(tf.reduce_max(tf.abs(w), axis=self._axes(w.shape.rank)) / float(self.qp),
                              MIN_WEIGHT_STEP)
        mean = tf.reduce_mean(tf.abs(w), axis=self._axes(w.shape.rank))
        return tf.maximum(2.0 * mean / tf.sqrt(float(self.qp)), MIN_WEIGHT_STEP)

    def initialize(self, w, qvars):
        """Set the step from the weights ``w`` now (eager), as the first training call would."""
        qvars.step.assign(self.initial_step(tf.convert_to_tensor(w)))
        qvars.initialized.assign(1.0)

    def __call__(self, inputs, training, weights, **kwargs):
        step_var = weights.step
        ready = _init_once(training, weights.initialized,
                           lambda: [step_var.assign(self.initial_step(inputs))])
        with tf.control_dependencies([ready]):
            s = tf.maximum(tf.abs(step_var.read_value()), MIN_WEIGHT_STEP)
        if self.bypass:
            return _bypassed(inputs, s)
        return self._quantize(inputs, s)

    def _quantize(self, w, s):
        qp, per_channel, bits = float(self.qp), self.per_channel, self.num_bits
        fq_top, fq_bits = float(self._fq_top), (self.num_bits if self.packed_int4 else 8)
        n = w.shape.num_elements() // (int(w.shape[-1]) if per_channel else 1)
        g = 1.0 / float(n * qp) ** 0.5
        axes = self._axes(w.shape.rank)

        @tf.custom_gradient
        def lsq(w, s):
            top = s * fq_top
            clipped = w if bits == 8 or self.packed_int4 else tf.clip_by_value(w, -s * qp, s * qp)
            y = fake_quant(clipped, -top, top, fq_bits, True, per_channel)

            def grad(dy):
                u = w / s
                inside = tf.logical_and(u >= -qp, u <= qp)
                dw = tf.where(inside, dy, tf.zeros_like(dy))
                ds_elem = tf.where(inside, (y - w) / s, tf.sign(u) * qp)
                ds = g * tf.reduce_sum(dy * ds_elem, axis=axes)
                return dw, ds
            return y, grad

        return lsq(w, s)

    def fake_quant_range(self, qvars):
        """(min, max) float32 numpy of the FakeQuant applied (per channel or scalar)."""
        import numpy as np
        s = np.maximum(np.abs(np.float32(qvars.step.numpy())), np.float32(MIN_WEIGHT_STEP))
        top = s * np.float32(self._fq_top)
        return -top, top

    def fake_quant_bits(self):
        return self.num_bits if self.packed_int4 else 8

    def steps(self, qvars):
        """The scale(s) the file holds, float32 numpy: fl32(fl32(127 s) / 127) (or / 7 packed)."""
        import numpy as np
        return self.fake_quant_range(qvars)[1] / np.float32(self._fq_top)

    def get_config(self):
        config = {"num_bits": self.num_bits, "per_channel": self.per_channel}
        if self.packed_int4:
            config["packed_int4"] = True
        # always written: the default was "paper" before 2026-11-27, so a config without it is ambiguous (harmless
        # once the step is initialised, as in any saved QAT model, but a reader should not have to know that)
        config["init"] = self.init
        return config


@_serializable
class LSQActivationQuantizer(_Base):
    """LSQ activation quantizer with a learned offset (LSQ+): per tensor, asymmetric, as TFLite's int8 activations.

    Forward: x_q = s * clip(round((x - beta) / s), 0, 2^b - 1) + beta, emitted as a FakeQuant on
    [beta, beta + (2^b - 1) s] (float32). The int8 file needs an integer zero point: FakeQuant and the converter
    both round -beta / s to the nearest integer (clamped to the grid, so the range always holds 0), i.e. the offset
    used is beta snapped to a multiple of the step; the file's scale is that FakeQuant's (within float32 rounding of
    s). Chosen over the unsigned LSQ form because the outputs quantized here are often signed (projection convs,
    adds, logits).
    Gradients: x gets the straight-through estimate inside the range; s gets g * sum(dy * (x_q - x) / s) inside,
    0 below, 2^b - 1 above; beta gets g * sum(dy) outside the range, 0 inside; g = 1 / sqrt(N * (2^b - 1)), N the
    number of features of one example.
    Initialisation (LSQ+'s min/max form): from the first training batch, beta = min(x_min, 0) and
    s = (max(x_max, 0) - beta) / (2^b - 1), the range the min-max quantizer starts from.
    The step used is |step| (at least ``MIN_RANGE / (2^b - 1)``), as for ``LSQWeightQuantizer``.
    Variables: ``step``, ``offset`` (trainable), ``initialized``.
    """

    def __init__(self, num_bits=8):
        self.num_bits = _check_bits(num_bits)
        self.qp = 2 ** self.num_bits - 1

    def build(self, tensor_shape, name, layer):
        return _variables(step=_learned_weight(layer, name + "_lsq_step", (), 1.0 / self.qp, True),
                          offset=_learned_weight(layer, name + "_lsq_offset", (), 0.0, True),
                          initialized=_flag(layer, name + "_lsq_initialized"))

    def _min_step(self):
        return MIN_RANGE / self.qp

    def __call__(self, inputs, training, weights, **kwargs):
        step_var, offset_var = weights.step, weights.offset

        def init():
            lo = tf.minimum(tf.reduce_min(inputs), 0.0)
            hi = tf.maximum(tf.reduce_max(inputs), 0.0)
            return [offset_var.assign(lo), step_var.assign((hi - lo) / float(self.qp))]

        ready = _init_once(training, weights.initialized, init)
        with tf.control_dependencies([ready]):
            s = tf.maximum(tf.abs(step_var.read_value()), self._min_step())
            beta = offset_var.read_value()
        if self.bypass:
            return _bypassed(inputs, s, beta)
        return self._quantize(inputs, s, beta)

    def _quantize(self, x, s, beta):
        qp, bits = float(self.qp), self.num_bits
        n = max(1, x.shape[1:].num_elements() or 1) if x.shape.rank else 1
        g = 1.0 / float(n * qp) ** 0.5

        @tf.custom_gradient
        def lsq(x, s, beta):
            y = fake_quant(x, beta, beta + s * qp, bits)

            def grad(dy):
                u = (x - beta) / s
                below, above = u < 0.0, u > qp
                inside = tf.logical_not(tf.logical_or(below, above))
                zeros = tf.zeros_like(dy)
                dx = tf.where(inside, dy, zeros)
                ds = g * tf.reduce_sum(dy * tf.where(inside, (y - x) / s, tf.where(above, qp + zeros, zeros)))
                dbeta = g * tf.reduce_sum(tf.where(inside, zeros, dy))
                return dx, ds, dbeta
            return y, grad

        return lsq(x, s, beta)

    def fake_quant_range(self, qvars):
        """(min, max) float32 numpy of the FakeQuant applied: (beta, beta + (2^b - 1) s)."""
        import numpy as np
        s = np.maximum(np.abs(np.float32(qvars.step.numpy())), np.float32(self._min_step()))
        beta = np.float32(qvars.offset.numpy())
        return beta, np.float32(beta + s * np.float32(self.qp))

    def get_config(self):
        return {"num_bits": self.num_bits}


@_serializable
class PACTQuantizer(_Base):
    """PACT: a learned clipping level alpha for non-negative activations (after ReLU / ReLU6).

    Forward: y = clip(x, 0, alpha) quantized on [0, alpha] (one FakeQuant on [0, alpha]: int8 scale
    fl32(alpha / (2^b - 1)), zero point -128). Gradients (paper, eq. 3): x gets 1 on [0, alpha), 0 elsewhere; alpha
    gets sum(dy) over x >= alpha. ``l2``: the paper's L2 regularisation of alpha (adds l2 * alpha^2 to the loss;
    0 turns it off). Initialisation: alpha = max of the first training batch (at least ``MIN_RANGE``).
    Variables: ``alpha`` (trainable), ``initialized``.
    """

    def __init__(self, num_bits=8, l2=0.0):
        self.num_bits = _check_bits(num_bits)
        if not l2 >= 0.0:
            raise ValueError(f"PACTQuantizer(l2={l2!r}): the L2 weight of alpha must be >= 0 (0 turns it off).")
        self.l2 = float(l2)

    def build(self, tensor_shape, name, layer):
        reg = keras.regularizers.L2(self.l2) if self.l2 > 0 else None
        return _variables(alpha=_learned_weight(layer, name + "_pact_alpha", (), 1.0, True, regularizer=reg),
                          initialized=_flag(layer, name + "_pact_initialized"))

    def __call__(self, inputs, training, weights, **kwargs):
        alpha_var = weights.alpha
        ready = _init_once(training, weights.initialized,
                           lambda: [alpha_var.assign(tf.maximum(tf.reduce_max(inputs), MIN_RANGE))])
        with tf.control_dependencies([ready]):
            alpha = tf.maximum(alpha_var.read_value(), MIN_RANGE)
        if self.bypass:
            return _bypassed(inputs, alpha)
        bits = self.num_bits

        @tf.custom_gradient
        def pact(x, alpha):
            y = fake_quant(x, tf.zeros_like(alpha), alpha, bits)

            def grad(dy):
                zeros = tf.zeros_like(dy)
                dx = tf.where(tf.logical_and(x >= 0.0, x < alpha), dy, zeros)
                return dx, tf.reduce_sum(tf.where(x >= alpha, dy, zeros))
            return y, grad

        return pact(inputs, alpha)

    def fake_quant_range(self, qvars):
        """(0, alpha) float32 numpy of the FakeQuant applied."""
        import numpy as np
        return np.float32(0.0), np.maximum(np.float32(qvars.alpha.numpy()), np.float32(MIN_RANGE))

    def get_config(self):
        config = {"num_bits": self.num_bits}
        if self.l2:
            config["l2"] = self.l2
        return config


# every quantizer class, for loaders that look classes up by name (legacy .h5, tfmot's quantize_scope)
ALL = (WeightQuantizer, ActivationQuantizer, FixedRangeQuantizer, SymmetricActivationQuantizer, LSQWeightQuantizer,
       LSQActivationQuantizer, PACTQuantizer)
