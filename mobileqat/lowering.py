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
from mobileqat.layers import FoldedConvBN
from mobileqat.ops import KERNELS
from mobileqat.quantizers import ActivationQuantizer, FixedRangeQuantizer

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


@dataclasses.dataclass
class QTensor:
    """An int8 activation tensor: name (the Keras layer that produces it), scale (float32), zero point."""
    name: str
    scale: np.float32
    zero_point: int


@dataclasses.dataclass
class IntOp:
    """One int8 op: kind ("conv2d", "depthwise_conv2d", "add", "fully_connected", "softmax", "reshape",
    "identity", or a kind of ``mobileqat.ops``: "mean_hw", "max_pool2d", ...), input tensor names, output
    tensor name and the op's constant parameters (int8 weights as TFLite stores them, int32 bias, float32
    filter scales, pool sizes, ...)."""
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

    def __init__(self, tensors, ops, input_name, output_name):
        self.tensors, self.ops = tensors, ops
        self.input, self.output = tensors[input_name], tensors[output_name]

    def quantize_input(self, x):
        return rt.quantize(x, self.input.scale, self.input.zero_point, np.int8).astype(np.int8)

    def run(self, codes, runtime="reference", keep_all=False):
        """int8 input codes (N, H, W, C) -> int8 output codes, or every tensor by name with keep_all."""
        arith = _arithmetic(runtime)
        values = {self.input.name: np.asarray(codes, np.int8)}
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
        codes = np.concatenate(outs) if outs else np.zeros((0,) + tuple(), np.int8)
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
        if op.kind == "add":
            return arith.add(xs[0], t_in[0].scale, t_in[0].zero_point, xs[1], t_in[1].scale, t_in[1].zero_point,
                             t_out.scale, t_out.zero_point, act_range=act)
        if op.kind == "softmax":
            return arith.softmax(xs[0], t_in[0].scale, t_in[0].zero_point)
        raise ValueError(f"unknown op kind {op.kind!r}")


def _arithmetic(runtime):
    if runtime not in _ARITHMETIC:
        raise ValueError(f"no integer arithmetic for runtime {runtime!r}: use one of {sorted(_ARITHMETIC)}.")
    return importlib.import_module(_ARITHMETIC[runtime])


# --- reading quantization parameters the way the converter does ---------------------------------

def quantization_params(rmin, rmax, num_bits=8, narrow_range=False):
    """Scale (double) and signed zero point of a FakeQuant range [rmin, rmax], as the TFLite converter
    computes them (fakeQuantAttrsToType): double arithmetic on the unsigned grid [0, 2^bits - 1]
    ([1, ...] with narrow_range), the zero point from the end with the smaller rounding error, nudged
    with round-half-away, then shifted to signed. The unsigned grid matters: a range [-1, 1] gives
    zero point 127.5 -> 128 -> 0, where the signed grid would give -0.5 -> -1."""
    qmin, qmax = int(narrow_range), (1 << num_bits) - 1
    rmin, rmax = float(np.float32(rmin)), float(np.float32(rmax))
    scale = (rmax - rmin) / (qmax - qmin)
    from_min, from_max = qmin - rmin / scale, qmax - rmax / scale
    err_min, err_max = abs(qmin) + abs(rmin / scale), abs(qmax) + abs(rmax / scale)
    zp = from_min if err_min < err_max else from_max
    zp = qmin if zp < qmin else qmax if zp > qmax else int(np.floor(zp + 0.5))  # zp >= 0 here
    return scale, int(zp) - (1 << (num_bits - 1))


def _require_8bit(quantizer, where):
    """Lowering reproduces the converter's 8-bit grids only; fewer bits come with the low-bit work."""
    bits = getattr(quantizer, "num_bits", 8)
    if bits != 8:
        raise ValueError(f"{where}: {type(quantizer).__name__} has num_bits={bits}; the integer-exact path covers "
                         "8-bit quantizers only (use the float simulation for lower bit widths).")
    return quantizer


def _output_range(wrapper):
    """(rmin, rmax) float32 of a wrapper's output quantizer, None when it keeps its input's scale."""
    quantizers = getattr(wrapper, "_output_quantizers", None) or []
    if not quantizers:
        return None
    q = _require_8bit(quantizers[0], f"layer '{wrapper.name}'")
    if isinstance(q, FixedRangeQuantizer):
        return np.float32(q.min_value), np.float32(q.max_value)
    if isinstance(q, ActivationQuantizer):
        v = wrapper._output_quantizer_vars
        amin = np.float32(v["min_var"].numpy())
        amax = np.float32(max(np.float32(v["max_var"].numpy()), np.float32(amin + np.float32(1e-6))))
        return amin, amax
    raise ValueError(f"layer '{wrapper.name}': lowering does not know the output quantizer {type(q).__name__}.")


def _input_range(layer):
    _require_8bit(layer.quantizer, f"layer '{layer.name}'")
    v = layer.quantizer_vars
    return np.float32(v["min_var"].numpy()), np.float32(v["max_var"].numpy())


def _quantize_weights(w_fq, amax, per_channel):
    """Fake-quantized float32 weights (..., C_out) and their symmetric ranges -> int8 codes, float32
    scales (C_out,) and the double scales the converter uses for the bias. The converter folds the
    FakeQuant op first and quantizes its output (already on the grid), so codes are exact integers."""
    scales = np.array([quantization_params(-a, a, 8, narrow_range=True)[0]
                       for a in np.atleast_1d(np.float32(amax))], np.float64)
    v = np.asarray(w_fq, np.float64) / (scales if per_channel else scales[0])
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)
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
    tensors, ops, double_scale = {}, [], {}
    input_name = output_name = None

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
        ops.append(_lower_layer(layer, inner, srcs, tensors, double_scale))
        output_name = layer.name
    if input_name is None:
        raise ValueError("the model has no QuantizeLayer at its input; lower a model returned by mobileqat.quantize.")
    return IntegerModel(tensors, ops, input_name, output_name)


def _lower_layer(wrapper, inner, srcs, tensors, double_scale):
    name = wrapper.name
    where = f"layer '{name}' ({type(inner).__name__})"
    if isinstance(inner, FoldedConvBN):
        if inner.depthwise and inner.depth_multiplier != 1:
            raise ValueError(f"{where}: depth_multiplier {inner.depth_multiplier} has no int8 op here yet.")
        _require_8bit(inner.weight_quantizer, where)
        w = inner.weight_quantizer(inner.folded_float_kernel(), False, inner._wq_vars).numpy()
        amax = inner._wq_vars["max_var"].numpy()
        q, scales, scales_d = _quantize_weights(w, amax, per_channel=inner.weight_quantizer.per_channel)
        if not inner.weight_quantizer.per_channel:
            scales_d = np.full(q.shape[-1], scales_d[0])
        q = q.transpose(2, 0, 1, 3) if inner.depthwise else q.transpose(3, 0, 1, 2)  # TFLite layouts
        bias = _quantize_bias(inner.folded_bias().numpy(), double_scale[srcs[0]], scales_d)
        return IntOp("depthwise_conv2d" if inner.depthwise else "conv2d", (srcs[0],), name, dict(
            weights=q, filter_scales=scales, bias=bias, stride=tuple(inner.strides),
            padding=inner.padding.upper(), activation=_activation(inner)))
    if type(inner) is keras.layers.Conv2D:  # a convolution with no BatchNormalization to fold: its own bias
        (kernel, quantizer, qvars), = wrapper._weight_vars
        _require_8bit(quantizer, where)
        w = quantizer(kernel, False, qvars).numpy()
        q, scales, scales_d = _quantize_weights(w, qvars["max_var"].numpy(), per_channel=quantizer.per_channel)
        if not quantizer.per_channel:
            scales_d = np.full(q.shape[-1], scales_d[0])
        bias = inner.bias.numpy() if inner.use_bias else np.zeros(q.shape[-1], np.float32)
        return IntOp("conv2d", (srcs[0],), name, dict(
            weights=q.transpose(3, 0, 1, 2), filter_scales=scales,
            bias=_quantize_bias(bias, double_scale[srcs[0]], scales_d), stride=tuple(inner.strides),
            padding=inner.padding.upper(), activation=_activation(inner)))
    if type(inner) is keras.layers.Dense:
        (kernel, quantizer, qvars), = wrapper._weight_vars
        _require_8bit(quantizer, where)
        w = quantizer(kernel, False, qvars).numpy()
        q, scales, scales_d = _quantize_weights(w, qvars["max_var"].numpy(), per_channel=quantizer.per_channel)
        bias = inner.bias.numpy() if inner.use_bias else np.zeros(q.shape[-1], np.float32)
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
    if isinstance(inner, keras.layers.Add) and len(srcs) == 2:
        return IntOp("add", tuple(srcs), name)
    pooling = _lower_pooling(wrapper, inner, srcs, where)
    if pooling is not None:
        return pooling
    if isinstance(inner, (keras.layers.Activation, keras.layers.Softmax)) and _is_softmax(inner):
        return IntOp("softmax", (srcs[0],), name)
    if isinstance(inner, _IDENTITY):
        return IntOp("identity", (srcs[0],), name)
    if isinstance(inner, _RESHAPE):
        shape = tuple(inner.output_shape[1:])
        return IntOp("reshape", (srcs[0],), name, dict(shape=shape))
    raise ValueError(f"{where} has no int8 op in mobileqat.lowering yet (supported: folded Conv/Depthwise+BN, "
                     "Dense, Conv2DTranspose, Add of two inputs, UpSampling2D, Resizing, Max/AveragePooling2D, "
                     "Global{Average,Max}Pooling2D, ZeroPadding2D, "
                     "Cropping2D, softmax, Dropout, Reshape/Flatten).")


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
    (kernel, quantizer, qvars), = wrapper._weight_vars
    _require_8bit(quantizer, where)
    if quantizer.per_channel:
        raise ValueError(f"{where}: per-channel weights; the converter writes Conv2DTranspose per-tensor only.")
    size = tuple(wrapper.output_shape[1:3])
    if None in size:
        raise ValueError(f"{where}: output size {size} is not fixed; lowering needs static spatial sizes.")
    w = quantizer(kernel, False, qvars).numpy()
    q, scales, scales_d = _quantize_weights(w, qvars["max_var"].numpy(), per_channel=False)
    bias = (_quantize_bias(inner.bias.numpy(), double_scale[srcs[0]], scales_d[0]) if inner.use_bias else None)
    return IntOp("transpose_conv", (srcs[0],), wrapper.name, dict(
        weights=q.transpose(2, 0, 1, 3).copy(), filter_scales=scales, bias=bias, stride=tuple(inner.strides),
        padding=inner.padding.upper(), output_size=size, activation=_activation(inner)))


def _is_softmax(layer):
    from mobileqat.transforms import activation_name
    return isinstance(layer, keras.layers.Softmax) or activation_name(layer) == "softmax"
