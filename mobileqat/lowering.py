"""The integer-exact evaluation path of a QAT model: lower it to int8 ops and run them in numpy.

``lower(qat_model)`` reads the model's own variables (folded weights, quantizer ranges) and returns
an ``IntegerModel``: the int8 graph the TFLite converter writes for it, with the same parameters
(int8 weights, int32 bias at scale input_scale * weight_scale, float32 scales, zero points), no
file needed. ``IntegerModel.predict(x, runtime)`` runs it with a runtime's arithmetic, bit for bit:

  "reference": ``mobileqat.integer``, the reference kernels (fixed-point requantization);
  "xnnpack":   ``mobileqat.integer_xnnpack``, the XNNPACK delegate (fp32 requantization).

So the accuracy seen in Python is the accuracy of the deployed file; the float fake-quant
simulation stays the training path.
"""
import dataclasses
import importlib

import numpy as np

from mobileqat import runtime as rt
from mobileqat._tf import keras, tfmot
from mobileqat.layers import FoldedConvBN, HardSigmoid, HardSwish, LayerNormCore
from mobileqat.ops import KERNELS
from mobileqat.quantizers import (MIN_RANGE, ActivationQuantizer, FixedRangeQuantizer, SymmetricActivationQuantizer,
                                  WeightQuantizer, symmetric_range, weight_fake_quant_range)

_qk = tfmot.quantization.keras
_ARITHMETIC = {"reference": "mobileqat.integer", "xnnpack": "mobileqat.integer_xnnpack"}
RUNTIMES = tuple(_ARITHMETIC)  # runtimes whose arithmetic IntegerModel reproduces
_FUSED = {"linear": None, "relu": "RELU", "relu6": "RELU6"}
_IDENTITY = (keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise)
_RESHAPE = (keras.layers.Reshape, keras.layers.Flatten)
# op kind -> the TFLite operator the converter writes for it ("identity"/"reshape" write no compute op)
TFLITE_OPS = {"conv2d": "CONV_2D", "depthwise_conv2d": "DEPTHWISE_CONV_2D", "add": "ADD", "mean_hw": "MEAN",
              "fully_connected": "FULLY_CONNECTED", "softmax": "SOFTMAX",
              "resize_nearest": "RESIZE_NEAREST_NEIGHBOR", "resize_bilinear": "RESIZE_BILINEAR",
              "transpose_conv": "TRANSPOSE_CONV"}
TFLITE_OPS.update(max_pool2d="MAX_POOL_2D", average_pool2d="AVERAGE_POOL_2D", pad="PAD",  # mobileqat.ops.pooling
                  strided_slice="STRIDED_SLICE", reduce_max_hw="REDUCE_MAX")
# elementwise ops and joins (mobileqat.ops.elementwise). "requantize" is the QUANTIZE int8 -> int8 the
# converter writes before a join input of another scale: like RESHAPE, provenance steps through it.
TFLITE_OPS.update(sub="SUB", mul="MUL", concatenation="CONCATENATION", maximum="MAXIMUM", minimum="MINIMUM")
_JOINS = {keras.layers.Concatenate: "concatenation", keras.layers.Maximum: "maximum", keras.layers.Minimum: "minimum"}
_ARITHMETIC_MERGES = {keras.layers.Add: "add", keras.layers.Subtract: "sub", keras.layers.Multiply: "mul"}
# ops whose output scale the converter may set to a join's scale (FoldTrivalRequantizeOp: the producer is
# neither a same-scale nor a fixed-range op and the join is its only user); other producers get a requantize
_FREE_SCALE = {"conv2d", "depthwise_conv2d", "fully_connected", "add", "sub", "mul", "mean_hw"}
# activations (mobileqat.ops.activations)
TFLITE_OPS.update(gelu="GELU", logistic="LOGISTIC", tanh="TANH", relu="RELU", relu6="RELU6", hard_swish="HARD_SWISH",
                  add_const="ADD", mul_const="MUL", swish_mul="MUL")
# LayerNormCore (mobileqat.ops.normalization; its SUB and MULs are the elementwise kernels)
TFLITE_OPS.update(mean_last="MEAN", rsqrt="RSQRT")


@dataclasses.dataclass
class QTensor:
    """An int8 activation tensor: name (the Keras layer that produces it), scale (float32), zero point."""
    name: str
    scale: np.float32
    zero_point: int


@dataclasses.dataclass
class IntOp:
    """One int8 op: kind ("conv2d", "depthwise_conv2d", "fully_connected", "softmax", "reshape",
    "identity", or a kind of ``mobileqat.ops.KERNELS``: "add", "mean_hw", "max_pool2d", "sub", "mul",
    "concatenation", "requantize", ...), input tensor names, output tensor name and the op's constant
    parameters (int8 weights as TFLite stores them, int32 bias, float32 filter scales, pool sizes, ...)."""
    kind: str
    inputs: tuple
    output: str
    params: dict = dataclasses.field(default_factory=dict)


class IntegerModel:
    """An int8 graph: ``ops`` in execution order over ``tensors`` (name -> QTensor).

    ``input``/``output`` name the graph's input and output tensors. Images (N, H, W, C) float go in
    through ``quantize_input`` (round half away from zero, as TFLite's QUANTIZE); outputs come out as
    int8 codes (``run``) or dequantized floats (``predict``).
    """

    def __init__(self, tensors, ops, input_name, output_name, dtype=np.int8):
        self.tensors, self.ops = tensors, ops
        self.input, self.output = tensors[input_name], tensors[output_name]
        self.dtype = np.dtype(dtype)  # int8, or int16 for an int16x8 model (scheme "w8a16")

    def quantize_input(self, x):
        return rt.quantize(x, self.input.scale, self.input.zero_point, self.dtype).astype(self.dtype)

    def run(self, codes, runtime="reference", keep_all=False):
        """Input codes (N, H, W, C) of ``dtype`` (int8, int16 for int16x8) -> output codes, or every tensor
        by name with keep_all."""
        arith = _arithmetic(runtime)
        values = {self.input.name: np.asarray(codes, self.dtype)}
        last_use = {name: i for i, op in enumerate(self.ops) for name in op.inputs}
        for i, op in enumerate(self.ops):
            values[op.output] = self._eval(op, values, arith, runtime)
            if not keep_all:
                for name in op.inputs:
                    if name != self.input.name and last_use[name] == i:  # no later op reads it
                        values.pop(name, None)
        return values if keep_all else values[self.output.name]

    def predict(self, x, runtime="reference", batch_size=64):
        """Float images (N, H, W, C) -> dequantized float outputs, as the deployed file computes them."""
        x = np.asarray(x, np.float32)
        outs = [self.run(self.quantize_input(x[i:i + batch_size]), runtime)
                for i in range(0, len(x), batch_size)]
        codes = np.concatenate(outs) if outs else np.zeros((0,) + tuple(), self.dtype)
        return (codes.astype(np.float32) - self.output.zero_point) * self.output.scale

    def _eval(self, op, values, arith, runtime):
        xs = [values[n] for n in op.inputs]
        t_in = [self.tensors[n] for n in op.inputs]
        t_out = self.tensors[op.output]
        p = op.params
        if op.kind in KERNELS:  # ops by family (mobileqat.ops)
            return KERNELS[op.kind][runtime](xs, [(t.scale, t.zero_point) for t in t_in],
                                            (t_out.scale, t_out.zero_point), **p)
        if op.kind in ("identity", "reshape"):
            return xs[0].reshape((len(xs[0]),) + tuple(p.get("shape", xs[0].shape[1:])))
        act = arith.activation_range(p.get("activation"), t_out.scale, t_out.zero_point) \
            if "activation" in p else (-128, 127)
        if op.kind in ("conv2d", "depthwise_conv2d"):
            fn = getattr(arith, op.kind)
            return fn(xs[0], t_in[0].scale, t_in[0].zero_point, p["weights"], p["filter_scales"], p["bias"],
                      t_out.scale, t_out.zero_point, stride=p["stride"], padding=p["padding"], act_range=act)
        if op.kind == "fully_connected":
            return arith.fully_connected(xs[0], t_in[0].scale, t_in[0].zero_point, p["weights"],
                                         p["filter_scales"], p["bias"], t_out.scale, t_out.zero_point,
                                         act_range=act)
        if op.kind == "softmax":
            return arith.softmax(xs[0], t_in[0].scale, t_in[0].zero_point)
        raise ValueError(f"unknown op kind {op.kind!r}")


def _arithmetic(runtime):
    if runtime not in _ARITHMETIC:
        raise ValueError(f"no integer arithmetic for runtime {runtime!r}: use one of {sorted(_ARITHMETIC)}.")
    return importlib.import_module(_ARITHMETIC[runtime])


# --- reading quantization parameters the way the converter does ---------------------------------

# The converter widens a FakeQuant range no wider than this to [min(rmin, -5e-7), max(rmax, 5e-7)]
# (kNearZeroTolerance, ExpandVerySmallRange in its quantization_utils.cc), so a channel of zero weights gets the
# scale 1e-6 / 254, not 0.
NEAR_ZERO_RANGE = 1.0e-6


def quantization_params(rmin, rmax, num_bits=8, narrow_range=False):
    """Scale (double) and signed zero point of a FakeQuant range [rmin, rmax], as the TFLite converter
    computes them (fakeQuantAttrsToType): double arithmetic on the unsigned grid [0, 2^bits - 1]
    ([1, ...] with narrow_range), the zero point from the end with the smaller rounding error, nudged
    with round-half-away, then shifted to signed. The unsigned grid matters: a range [-1, 1] gives
    zero point 127.5 -> 128 -> 0, where the signed grid would give -0.5 -> -1. A range of at most
    ``NEAR_ZERO_RANGE`` is widened first, as the converter does."""
    qmin, qmax = int(narrow_range), (1 << num_bits) - 1
    rmin, rmax = float(np.float32(rmin)), float(np.float32(rmax))
    if not rmax - rmin > NEAR_ZERO_RANGE:  # the converter's ExpandVerySmallRange (a dead channel's weights)
        rmin, rmax = min(rmin, -NEAR_ZERO_RANGE / 2), max(rmax, NEAR_ZERO_RANGE / 2)
    scale = (rmax - rmin) / (qmax - qmin)
    from_min, from_max = qmin - rmin / scale, qmax - rmax / scale
    err_min, err_max = abs(qmin) + abs(rmin / scale), abs(qmax) + abs(rmax / scale)
    zp = from_min if err_min < err_max else from_max
    zp = qmin if zp < qmin else qmax if zp > qmax else int(np.floor(zp + 0.5))  # zp >= 0 here
    return scale, int(zp) - (1 << (num_bits - 1))


def _require_8bit(quantizer, where):
    """Activations: lowering reproduces the converter's 8-bit activation grids, and 16-bit int16x8 ones
    (SymmetricActivationQuantizer, a 16-bit FixedRangeQuantizer, tfmot's 16-bit symmetric input quantizer)."""
    bits = getattr(quantizer, "num_bits", 8)
    if bits == 16 and (isinstance(quantizer, (SymmetricActivationQuantizer, FixedRangeQuantizer))
                       or type(quantizer).__name__ == "AllValuesQuantizer"):
        return quantizer
    if bits != 8:
        raise ValueError(f"{where}: {type(quantizer).__name__} has num_bits={bits}; the integer-exact path covers "
                         "8-bit activation quantizers only (use the float simulation for lower bit widths).")
    return quantizer


def _weight_max(quantizer, qvars, where, packed_ok=False):
    """The symmetric range (float32, per channel or scalar) of the 8-bit FakeQuant a WeightQuantizer
    applies: max|w| for 8 bits, the n-bit step times 127 below (``weight_fake_quant_range``)."""
    if hasattr(quantizer, "fake_quant_range") and not isinstance(quantizer, WeightQuantizer):  # learned (LSQ)
        if quantizer.packed_int4 and not packed_ok:
            raise ValueError(f"{where}: packed INT4 weights are lowered for Dense layers only; quantize with a "
                             "QuantScheme, which packs Dense layers only.")
        return quantizer.fake_quant_range(qvars)[1]
    if not isinstance(quantizer, WeightQuantizer):
        raise ValueError(f"{where}: lowering does not know the weight quantizer {type(quantizer).__name__}.")
    if quantizer.packed_int4 and not packed_ok:
        raise ValueError(f"{where}: packed INT4 weights (WeightQuantizer(packed_int4=True)) are lowered for Dense "
                         "layers only (the reference kernels have no int4 DEPTHWISE_CONV_2D and XNNPACK delegates "
                         "int4 FULLY_CONNECTED only); quantize with a QuantScheme, which packs Dense layers only.")
    if quantizer.packed_int4:  # an n-bit FakeQuant: the converter's scale is that of the n-bit grid
        return np.float32(qvars["max_var"].numpy())
    return weight_fake_quant_range(np.float32(qvars["max_var"].numpy()), quantizer.num_bits)


def _fake_quant_bits(quantizer):
    """The bit width of the FakeQuant a weight quantizer emits: n for packed INT4, else 8."""
    if hasattr(quantizer, "fake_quant_bits"):
        return quantizer.fake_quant_bits()
    return quantizer.num_bits if getattr(quantizer, "packed_int4", False) else 8


def _weight_quantization(wrapper, where):
    """(kernel, quantizer, its variables) of a wrapper whose kernel is fake-quantized in place."""
    if len(wrapper._weight_vars) != 1:
        raise ValueError(f"{where}: its kernel is not fake-quantized (tfmot's layout pass gave it a no-op "
                         "config); quantize the float model again with mobileqat.quantize.")
    return wrapper._weight_vars[0]


def _output_range(wrapper):
    """(rmin, rmax) float32 of a wrapper's output quantizer, None when it keeps its input's scale."""
    quantizers = getattr(wrapper, "_output_quantizers", None) or []
    if not quantizers:
        return None
    q = _require_8bit(quantizers[0], f"layer '{wrapper.name}'")
    if isinstance(q, FixedRangeQuantizer) and q.num_bits == 16:
        return np.float32(q.min_value), np.float32(q.max_value), 16, False
    if isinstance(q, FixedRangeQuantizer):
        return np.float32(q.min_value), np.float32(q.max_value)
    if isinstance(q, SymmetricActivationQuantizer):  # [-m, m], 16-bit narrow: zero point 0
        v = wrapper._output_quantizer_vars
        m = symmetric_range(v["min_var"].numpy(), v["max_var"].numpy())
        return -m, m, 16, True
    if isinstance(q, ActivationQuantizer):
        v = wrapper._output_quantizer_vars
        amin = np.float32(v["min_var"].numpy())
        amax = np.float32(max(np.float32(v["max_var"].numpy()), np.float32(amin + np.float32(MIN_RANGE))))
        return amin, amax
    if hasattr(q, "fake_quant_range"):  # learned ranges (LSQ, PACT)
        return tuple(np.float32(v) for v in q.fake_quant_range(wrapper._output_quantizer_vars))
    raise ValueError(f"layer '{wrapper.name}': lowering does not know the output quantizer {type(q).__name__}.")


def _input_range(layer):
    q = _require_8bit(layer.quantizer, f"layer '{layer.name}'")
    v = layer.quantizer_vars
    rng = np.float32(v["min_var"].numpy()), np.float32(v["max_var"].numpy())
    if getattr(q, "num_bits", 8) == 16:  # AllValuesQuantizer(16, symmetric, narrow_range): vars kept symmetric
        return rng + (16, bool(getattr(q, "narrow_range", True)))
    return rng


def _quantize_weights(w_fq, amax, per_channel, bits=8):
    """Fake-quantized float32 weights (..., C_out) and their symmetric ranges -> int8 codes, float32
    scales (C_out,) and the double scales the converter uses for the bias. The converter folds the
    FakeQuant op first and quantizes its output (already on the grid), so codes are exact integers."""
    scales = np.array([quantization_params(-a, a, bits, narrow_range=True)[0]
                       for a in np.atleast_1d(np.float32(amax))], np.float64)
    v = np.asarray(w_fq, np.float64) / (scales if per_channel else scales[0])
    top = 2 ** (bits - 1) - 1
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -top, top).astype(np.int8)
    return q, scales.astype(np.float32), scales


def _quantize_bias(b, input_scale_double, filter_scales_double):
    v = np.asarray(b, np.float64) / (input_scale_double * filter_scales_double)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int32)


def _activation(layer):
    name = keras.activations.serialize(layer.activation) if layer.activation is not None else "linear"
    if name not in _FUSED:
        raise ValueError(f"layer '{layer.name}': activation '{name}' cannot be fused into an int8 op.")
    return _FUSED[name]


def _inbound(model):
    """layer name -> names of the layers feeding it (functional graph, first call only)."""
    names = {}
    for cfg in model.get_config()["layers"]:
        nodes = cfg.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise ValueError(f"layer '{cfg['name']}' is called {len(nodes)} times; lowering needs each "
                             "layer used once (build the model without shared layers).")
        names[cfg["name"]] = [entry[0] for entry in nodes[0]] if nodes else []
    return names


def lower(qat_model):
    """The ``IntegerModel`` of a QAT model from ``mobileqat.quantize`` (or ``load_qat_model``).

    Raises ValueError naming any layer that has no int8 op here yet."""
    inbound = _inbound(qat_model)
    tensors, ops, double_scale, bits = {}, [], {}, set()
    input_name = output_name = None
    heads = _join_scale_heads(qat_model, inbound)

    def add_tensor(name, rng, like=None):
        if rng is None:  # keeps its input's quantization
            tensors[name] = dataclasses.replace(tensors[like], name=name)
            double_scale[name] = double_scale[like]
            return
        if not rng[0] < rng[1]:
            raise ValueError(f"layer '{name}': its quantization range [{rng[0]}, {rng[1]}] is empty; the QAT "
                             "model has not seen data yet: fit it (or run it once with training=True) first.")
        scale, zp = quantization_params(*rng)
        tensors[name] = QTensor(name, np.float32(scale), zp)
        double_scale[name] = scale
        bits.add(rng[2] if len(rng) > 2 else 8)

    for layer in qat_model.layers:
        srcs = inbound[layer.name]
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if type(layer).__name__ == "QuantizeLayer":  # tfmot's input quantizer (not in its public API)
            add_tensor(layer.name, _input_range(layer))
            input_name = layer.name
            output_name = layer.name
            continue
        if not isinstance(layer, (_qk.QuantizeWrapperV2, _qk.QuantizeWrapper)):
            raise ValueError(f"layer '{layer.name}' ({type(layer).__name__}) is not quantized; lower a model "
                             "returned by mobileqat.quantize.")
        inner = layer.layer
        add_tensor(layer.name, _output_range(layer), like=srcs[0])
        new = _lower_layer(layer, inner, srcs, tensors, double_scale)
        if layer.name in heads:
            new = _requantize_head(new, heads[layer.name], tensors, double_scale)
        for op in new if isinstance(new, list) else [new]:
            if _fuse_activation(ops, op, inbound):
                continue
            if op.kind in _JOINS.values():
                ops.extend(_join_inputs(op, ops, tensors, double_scale, inbound))
            ops.append(op)
        output_name = layer.name
    if input_name is None:
        raise ValueError("the model has no QuantizeLayer at its input; lower a model returned by mobileqat.quantize.")
    if 16 in bits:
        return _int16x8(qat_model, tensors, ops, input_name, output_name, bits)
    return IntegerModel(tensors, ops, input_name, output_name)


# int16x8 (scheme "w8a16"): op kinds with a 16-bit kernel (mobileqat.ops.int16x8), and kinds that move codes
_INT16_KINDS = {"conv2d": "conv2d_i16", "depthwise_conv2d": "depthwise_conv2d_i16", "add": "add_i16",
                "fully_connected": "fully_connected_i16", "mean_hw": "mean_hw_i16", "softmax": "softmax_i16",
                "max_pool2d": "max_pool2d_i16", "average_pool2d": "average_pool2d_i16"}
_INT16_MOVES = ("identity", "reshape")
TFLITE_OPS.update({i16: TFLITE_OPS[kind] for kind, i16 in _INT16_KINDS.items()})


def _int16x8(qat_model, tensors, ops, input_name, output_name, bits):
    """The IntegerModel of an int16x8 model: every tensor 16-bit with zero point 0, every op one with an
    int16 kernel (int64 biases); raises ValueError naming the layers it cannot reproduce."""
    problems = []
    if bits != {16}:
        eight = sorted(n for n, t in tensors.items() if t.zero_point != 0)
        problems.append(f"it mixes 8-bit and 16-bit activation ranges ({', '.join(eight[:5])} ...): "
                        "quantize the float model again with one scheme's activation_bits for every layer")
    for t in tensors.values():
        if t.zero_point != 0 and not problems:
            problems.append(f"tensor '{t.name}' has zero point {t.zero_point}; int16 activations need 0")
    out = []
    for op in ops:
        if op.kind in _INT16_MOVES:
            out.append(op)
        elif op.kind in _INT16_KINDS:
            params = dict(op.params)
            if params.get("bias") is not None:
                params["bias"] = np.asarray(params["bias"], np.int64)  # export widens int32 biases to int64
                if op.kind == "fully_connected" and not params["bias"].any():
                    params["bias"] = None  # the converter writes no bias tensor, and the builtin kernel then differs
            out.append(IntOp(_INT16_KINDS[op.kind], op.inputs, op.output, params))
        else:
            problems.append(f"layer '{op.output}': {TFLITE_OPS.get(op.kind, op.kind)} has no int16x8 kernel in "
                            f"mobileqat.ops.int16x8 yet (int16x8 covers {', '.join(sorted(set(TFLITE_OPS[k] for k in _INT16_KINDS)))})")
    if problems:
        raise ValueError(f"model '{qat_model.name}' (16-bit activations, TFLite int16x8): the integer-exact path "
                         "cannot reproduce it: " + "; ".join(problems) + ". Use the float simulation, or "
                         "8-bit activations ('w8a8').")
    return IntegerModel(tensors, out, input_name, output_name, dtype=np.int16)


def _lower_layer(wrapper, inner, srcs, tensors, double_scale):
    name = wrapper.name
    where = f"layer '{name}' ({type(inner).__name__})"
    if isinstance(inner, LayerNormCore):
        return _lower_layer_norm(wrapper, inner, srcs, tensors, double_scale)
    if isinstance(inner, FoldedConvBN):
        if inner.depthwise and inner.depth_multiplier != 1:
            raise ValueError(f"{where}: depth_multiplier {inner.depth_multiplier} has no int8 op here yet.")
        w = inner.weight_quantizer(inner.folded_float_kernel(), False, inner._wq_vars).numpy()
        amax = _weight_max(inner.weight_quantizer, inner._wq_vars, where)
        q, scales, scales_d = _quantize_weights(w, amax, per_channel=inner.weight_quantizer.per_channel)
        if not inner.weight_quantizer.per_channel:
            scales_d = np.full(q.shape[-1], scales_d[0])
        q = q.transpose(2, 0, 1, 3) if inner.depthwise else q.transpose(3, 0, 1, 2)  # TFLite layouts
        bias = _quantize_bias(inner.folded_bias().numpy(), double_scale[srcs[0]], scales_d)
        return IntOp("depthwise_conv2d" if inner.depthwise else "conv2d", (srcs[0],), name, dict(
            weights=q, filter_scales=scales, bias=bias, stride=tuple(inner.strides),
            padding=inner.padding.upper(), activation=_activation(inner)))
    if type(inner) is keras.layers.Conv2D:  # a convolution with no BatchNormalization to fold: its own bias
        kernel, quantizer, qvars = _weight_quantization(wrapper, where)
        w = quantizer(kernel, False, qvars).numpy()
        q, scales, scales_d = _quantize_weights(w, _weight_max(quantizer, qvars, where),
                                                per_channel=quantizer.per_channel)
        if not quantizer.per_channel:
            scales_d = np.full(q.shape[-1], scales_d[0])
        bias = inner.bias.numpy() if inner.use_bias else np.zeros(q.shape[-1], np.float32)
        return IntOp("conv2d", (srcs[0],), name, dict(
            weights=q.transpose(3, 0, 1, 2), filter_scales=scales,
            bias=_quantize_bias(bias, double_scale[srcs[0]], scales_d), stride=tuple(inner.strides),
            padding=inner.padding.upper(), activation=_activation(inner)))
    if type(inner) is keras.layers.Dense:
        kernel, quantizer, qvars = _weight_quantization(wrapper, where)
        w = quantizer(kernel, False, qvars).numpy()
        q, scales, scales_d = _quantize_weights(w, _weight_max(quantizer, qvars, where, packed_ok=True),
                                                per_channel=quantizer.per_channel, bits=_fake_quant_bits(quantizer))
        bias = inner.bias.numpy() if inner.use_bias else np.zeros(q.shape[-1], np.float32)
        if quantizer.packed_int4 and q.shape[0] % 2:
            raise ValueError(f"{where}: packed INT4 weights with {q.shape[0]} (odd) inputs: XNNPACK leaves that "
                             "FULLY_CONNECTED to the builtin kernel, whose result the integer path does not reproduce "
                             "(1 LSB measured); quantize with a QuantScheme, which packs Dense layers with an even "
                             "input count only.")
        return IntOp("fully_connected", (srcs[0],), name, dict(
            weights=q.T.copy(), filter_scales=scales, bias=_quantize_bias(bias, double_scale[srcs[0]], scales_d[0]),
            activation=_activation(inner)))
    if type(inner) is keras.layers.Conv2DTranspose:
        return _lower_transpose_conv(wrapper, inner, srcs, double_scale, where)
    if isinstance(inner, (keras.layers.UpSampling2D, keras.layers.Resizing)):  # keeps its input's scale
        size = tuple(wrapper.output_shape[1:3])
        if None in size or inner.interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"{where}: interpolation '{inner.interpolation}' to size {size} has no int8 op here "
                             "(nearest or bilinear to a fixed size only).")
        return IntOp(f"resize_{inner.interpolation}", (srcs[0],), name, dict(size=size))
    merge = next((kind for cls, kind in {**_ARITHMETIC_MERGES, **_JOINS}.items() if type(inner) is cls), None)
    if merge is not None:
        if len(srcs) != 2 and merge != "concatenation":
            raise ValueError(f"{where} has {len(srcs)} inputs; the int8 op takes two (mobileqat.quantize splits "
                             "such merges into a chain of two-input layers: quantize the float model again).")
        if merge != "concatenation":
            return IntOp(merge, tuple(srcs), name)
        rank = len(wrapper.output_shape)
        axis = inner.axis % rank
        if axis == 0:
            raise ValueError(f"{where} concatenates along the batch axis; the int8 path concatenates features.")
        return IntOp("concatenation", tuple(srcs), name, dict(axis=axis))
    pooling = _lower_pooling(wrapper, inner, srcs, where)
    if pooling is not None:
        return pooling
    if isinstance(inner, (keras.layers.Activation, keras.layers.Softmax)) and _is_softmax(inner):
        return IntOp("softmax", (srcs[0],), name)
    lowered = _lower_activation(wrapper, inner, srcs, tensors, double_scale)
    if lowered is not None:
        return lowered
    if isinstance(inner, _IDENTITY):
        return IntOp("identity", (srcs[0],), name)
    if isinstance(inner, _RESHAPE):
        shape = tuple(wrapper.output_shape[1:])  # the inner layer of a reloaded model was never called
        return IntOp("reshape", (srcs[0],), name, dict(shape=shape))
    raise ValueError(f"{where} has no int8 op in mobileqat.lowering yet (supported: folded Conv/Depthwise+BN, "
                     "Dense, Conv2DTranspose, Add/Subtract/Multiply/Maximum/Minimum of two inputs, Concatenate, "
                     "UpSampling2D, Resizing, Max/AveragePooling2D, Global{Average,Max}Pooling2D, ZeroPadding2D, "
                     "Cropping2D, softmax, sigmoid, tanh, swish, gelu, ReLU, ReLU6, HardSwish, HardSigmoid, Dropout, "
                     "Reshape/Flatten).")


def _lower_layer_norm(wrapper, inner, srcs, tensors, double_scale):
    """LayerNormCore -> MEAN(-1), SUB, MUL(d, d), MEAN(-1), RSQRT, MUL(d, r), in the file's order; the
    intermediate tensors (``<layer>/mean``, ...) take the ranges of the layer's own quantizers."""
    name = wrapper.name
    if not getattr(inner, "quantized", False) or not hasattr(inner, "_qvars"):
        raise ValueError(f"layer '{name}' (LayerNormCore): its intermediate tensors are not fake-quantized; "
                         "quantize the float model again with mobileqat.quantize.")
    for part in LayerNormCore.INTERMEDIATES:
        v = inner._qvars[part]
        amin = np.float32(v["min_var"].numpy())
        amax = np.float32(max(np.float32(v["max_var"].numpy()), np.float32(amin + np.float32(MIN_RANGE))))
        if not amin < amax:
            raise ValueError(f"layer '{name}': the range of its {part} tensor is empty; fit the QAT model first.")
        scale, zp = quantization_params(amin, amax)
        t = f"{name}/{part}"
        tensors[t], double_scale[t] = QTensor(t, np.float32(scale), zp), scale
    t = {part: f"{name}/{part}" for part in LayerNormCore.INTERMEDIATES}
    return [IntOp("mean_last", (srcs[0],), t["mean"]),
            IntOp("sub", (srcs[0], t["mean"]), t["centered"]),
            IntOp("mul", (t["centered"], t["centered"]), t["square"]),
            IntOp("mean_last", (t["square"],), t["variance"]),
            IntOp("rsqrt", (t["variance"],), t["rsqrt"]),
            IntOp("mul", (t["centered"], t["rsqrt"]), name)]


def _lower_pooling(wrapper, inner, srcs, where):
    """The mobileqat.ops.pooling op of a pooling/padding/cropping layer, or None for other layers."""
    L = keras.layers
    if isinstance(inner, L.GlobalAveragePooling2D):  # MEAN, with its own output range
        return IntOp("mean_hw", (srcs[0],), wrapper.name, dict(keepdims=bool(inner.keepdims)))
    if isinstance(inner, (L.MaxPooling2D, L.AveragePooling2D)):
        kind = "max_pool2d" if isinstance(inner, L.MaxPooling2D) else "average_pool2d"
        params = dict(pool=tuple(inner.pool_size), stride=tuple(inner.strides), padding=inner.padding.upper())
    elif isinstance(inner, L.ZeroPadding2D):
        kind, params = "pad", dict(paddings=tuple(tuple(p) for p in inner.padding))
    elif isinstance(inner, L.Cropping2D):
        kind, params = "strided_slice", dict(cropping=tuple(tuple(c) for c in inner.cropping))
    elif isinstance(inner, L.GlobalMaxPooling2D):
        kind, params = "reduce_max_hw", dict(keepdims=bool(inner.keepdims))
    else:
        return None
    if _output_range(wrapper) is not None:  # e.g. a QAT model saved when AveragePooling2D requantized
        raise ValueError(f"{where}: it has its own output range, but the int8 {TFLITE_OPS[kind]} keeps its "
                         "input's scale (the converter adds a QUANTIZE after it, which lowering does not "
                         "reproduce); quantize the float model again with mobileqat.quantize.")
    return IntOp(kind, (srcs[0],), wrapper.name, params)


def _lower_transpose_conv(wrapper, inner, srcs, double_scale, where):
    """Conv2DTranspose -> TRANSPOSE_CONV: per-tensor int8 weights, kernel (kh, kw, out, in) -> OHWI."""
    kernel, quantizer, qvars = _weight_quantization(wrapper, where)
    if quantizer.per_channel:
        raise ValueError(f"{where}: per-channel weights; the converter writes Conv2DTranspose per-tensor only.")
    size = tuple(wrapper.output_shape[1:3])
    if None in size:
        raise ValueError(f"{where}: output size {size} is not fixed; lowering needs static spatial sizes.")
    w = quantizer(kernel, False, qvars).numpy()
    q, scales, scales_d = _quantize_weights(w, _weight_max(quantizer, qvars, where), per_channel=False)
    bias = (_quantize_bias(inner.bias.numpy(), double_scale[srcs[0]], scales_d[0]) if inner.use_bias else None)
    return IntOp("transpose_conv", (srcs[0],), wrapper.name, dict(
        weights=q.transpose(2, 0, 1, 3).copy(), filter_scales=scales, bias=bias, stride=tuple(inner.strides),
        padding=inner.padding.upper(), output_size=size, activation=_activation(inner)))


def _join_scale_heads(model, inbound):
    """Where a same-scale join's scale flows back through pass-through ops, as the converter's quantization
    driver (``quantization_driver.cc``) propagates it: {layer name: the join wrapper whose scale its
    output takes after a requantize}.

    A join (CONCATENATION, MAXIMUM, MINIMUM: its own output range) whose input is the output of a
    pass-through layer (pooling, padding, cropping, reshape, resize: no range of its own, a same-scale
    op in the file) gives that tensor its scale, and the driver carries it back to the pass-through
    layer's input while that is another pass-through output not yet given a scale. The first layer of
    that chain (the head) computes at its input's scale and is followed by a QUANTIZE to the join's
    scale (``RequantizeState::ON_INPUT``), whose result every user of the head reads; the chain after it
    runs at the join's scale. E.g. DenseNet: ZeroPadding2D -> QUANTIZE -> MaxPooling2D, whose output
    feeds the first Concatenate and the BatchNormalization beside it; AveragePooling2D -> QUANTIZE ->
    Concatenate and BatchNormalization. A join input with a range of its own (or already given one)
    keeps it and is requantized for the join alone (``_join_inputs``). The driver pops ops from the end
    of the function, so where two joins reach one chain the later one (here: in Keras layer order)
    would take it; the converter of TF 2.21 then fails instead ("quantization parameters violate the same
    scale constraint" on the pass-through op: a MaxPooling2D output into a Concatenate through Cropping2D and into
    another through Dropout, measured), so such a model never reaches lowering."""
    layers = {layer.name: layer for layer in model.layers}

    def value(name):  # Dropout-like layers write no op: their output is their input's tensor
        while isinstance(getattr(layers[name], "layer", None), _IDENTITY):
            name = inbound[name][0]
        return name

    def pass_through(name):
        layer = layers[name]
        return (isinstance(layer, (_qk.QuantizeWrapperV2, _qk.QuantizeWrapper)) and len(inbound[name]) == 1
                and _output_range(layer) is None)

    claimed, heads = set(), {}
    for join in reversed(model.layers):
        if type(getattr(join, "layer", None)) not in _JOINS or _output_range(join) is None:
            continue
        for src in inbound[join.name]:
            v = value(src)
            while pass_through(v) and v not in claimed:
                claimed.add(v)
                before = value(inbound[v][0])
                if not pass_through(before) or before in claimed:
                    heads[v] = join
                    break
                v = before
    return heads


def _requantize_head(new, join, tensors, double_scale):
    """The op(s) of a chain head (``_join_scale_heads``) write their output at their input's scale under
    ``<layer>/unrequantized``; a "requantize" op brings it to ``join``'s scale under the layer's name."""
    op = new[-1] if isinstance(new, list) else new
    name = op.output
    scale, zp = quantization_params(*_output_range(join))
    if (tensors[name].scale, tensors[name].zero_point) == (np.float32(scale), zp):
        return new
    before = f"{name}/unrequantized"
    tensors[before] = dataclasses.replace(tensors[name], name=before)
    double_scale[before] = double_scale[name]
    tensors[name], double_scale[name] = QTensor(name, np.float32(scale), zp), scale
    op.output = before
    return (new if isinstance(new, list) else [new]) + [IntOp("requantize", (before,), name)]


def _join_inputs(op, ops, tensors, double_scale, inbound):
    """Give every input of a same-scale join (CONCATENATION, MAXIMUM, MINIMUM) the join's output scale
    and zero point, as the converter does: an input produced by a free-scale op (through Dropout-like
    identities) that the join alone uses is written at the join's scale (the requantize is folded into
    its producer); any other input gets a "requantize" op (QUANTIZE int8 -> int8). Returns the ops to
    run before the join; ``op.inputs`` then names the requantized tensors."""
    uses = {}
    for sources in inbound.values():
        for s in sources:
            uses[s] = uses.get(s, 0) + 1
    producer = {o.output: o for o in ops}
    target = tensors[op.output]
    inputs, extra = [], []
    for i, src in enumerate(op.inputs):
        t = tensors[src]
        if (t.scale, t.zero_point) == (target.scale, target.zero_point):
            inputs.append(src)
            continue
        chain = [src]
        while chain[-1] in producer and producer[chain[-1]].kind == "identity" and uses.get(chain[-1]) == 1:
            chain.append(producer[chain[-1]].inputs[0])
        if all(uses.get(n) == 1 for n in chain) and chain[-1] in producer and producer[chain[-1]].kind in _FREE_SCALE:
            for n in chain:
                tensors[n] = dataclasses.replace(target, name=n)
                double_scale[n] = double_scale[op.output]
            inputs.append(src)
            continue
        name = f"{src}/requantized_for/{op.output}:{i}"
        tensors[name] = dataclasses.replace(target, name=name)
        double_scale[name] = double_scale[op.output]
        extra.append(IntOp("requantize", (src,), name))
        inputs.append(name)
    op.inputs = tuple(inputs)
    return extra


# --- activations (mobileqat.ops.activations) ---------------------------------------------------------

_RELU_KINDS = {"relu": "RELU", "relu6": "RELU6"}
# ops the converter fuses a following ReLU/ReLU6 into, when it is the only user (measured: ADD, MUL,
# FULLY_CONNECTED; CONV_2D/DEPTHWISE_CONV_2D as fold_batchnorm relies on)
_FUSES_ACTIVATION = ("add", "mul", "mul_const", "swish_mul", "fully_connected", "conv2d", "depthwise_conv2d")


def _const_operand(value):
    """A float constant the converter quantizes on its own per-tensor range [min(0, v), max(0, v)]:
    (int8 code, float32 scale, zero point)."""
    value = float(np.float32(value))
    scale, zp = quantization_params(min(0.0, value), max(0.0, value))
    code = int(np.clip(rt.quantize(value, np.float32(scale), zp, np.int8), -128, 127))
    return dict(const=code, const_scale=np.float32(scale), const_zero_point=zp)


def _lower_activation(wrapper, inner, srcs, tensors, double_scale):
    """IntOp(s) of an activation layer, or None when ``inner`` is not one."""
    name = wrapper.name
    if isinstance(inner, (keras.layers.Activation, keras.layers.ReLU)):
        from mobileqat.transforms import activation_name
        activation = activation_name(inner)
        if activation == "swish":  # x * sigmoid(x): LOGISTIC (range fixed by TFLite), MUL
            mid = f"{name}/sigmoid"
            tensors[mid], double_scale[mid] = QTensor(mid, np.float32(1 / 256), -128), 1 / 256
            return [IntOp("logistic", (srcs[0],), mid), IntOp("swish_mul", (srcs[0], mid), name)]
        if activation == "gelu":  # keras.activations.gelu: approximate=False
            return IntOp("gelu", (srcs[0],), name, dict(approximate=False))
        kind = {"sigmoid": "logistic", "tanh": "tanh", "relu": "relu", "relu6": "relu6"}.get(activation)
        return IntOp(kind, (srcs[0],), name) if kind else None
    if isinstance(inner, HardSwish):
        return IntOp("hard_swish", (srcs[0],), name)
    if isinstance(inner, HardSigmoid):  # ADD(x, 3) + RELU6 on [0, 6], then MUL(., 1/6)
        mid = f"{name}/relu6"
        scale, zp = quantization_params(*HardSigmoid.RELU6_RANGE)
        tensors[mid], double_scale[mid] = QTensor(mid, np.float32(scale), zp), scale
        return [IntOp("add_const", (srcs[0],), mid, dict(_const_operand(3.0), activation="RELU6")),
                IntOp("mul_const", (mid,), name, _const_operand(1.0 / 6.0))]
    return None


def _fuse_activation(ops, op, inbound):
    """A RELU/RELU6 after an op that takes a fused activation, and the only user of its output, becomes
    that op's fused activation: the converter writes one op with the activation's output range (the
    producer's own range is not in the file). Returns True when ``op`` was fused into ``ops``."""
    if op.kind not in _RELU_KINDS:
        return False
    src = op.inputs[0]
    users = [layer for layer, parents in inbound.items() if src in parents]
    for i, prev in enumerate(ops):
        if prev.output == src and prev.kind in _FUSES_ACTIVATION and prev.params.get("activation") is None \
                and len(users) == 1:
            ops[i] = IntOp(prev.kind, prev.inputs, op.output, dict(prev.params, activation=_RELU_KINDS[op.kind]))
            return True
    return False


def _is_softmax(layer):
    from mobileqat.transforms import activation_name
    return isinstance(layer, keras.layers.Softmax) or activation_name(layer) == "softmax"
