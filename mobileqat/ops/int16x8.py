"""TFLite int16x8 ops (16-bit activations, 8-bit weights; scheme "w8a16"): the arithmetic in numpy.

Activations are int16 with zero point 0, weights int8 (per channel for CONV_2D / DEPTHWISE_CONV_2D,
per tensor for FULLY_CONNECTED), biases int64 at scale input_scale * weight_scale (``export`` widens the
converter's int32 biases). XNNPACK delegates no int16x8 op (measured: no DELEGATE node): on LiteRT's
default path ("xnnpack") every op runs on the builtin kernels. Each kernel's rounding was chosen by
matching the interpreter's codes op by op, on both paths (``tests/test_ops_int16.py``), not assumed:

  CONV_2D, DEPTHWISE_CONV_2D: int64 accumulator sum(x * w) + bias (no input offset), then
      MultiplyByQuantizedMultiplier(int64) per channel (16-bit multiplier, one rounding) with
      QuantizeMultiplier(double(s_in) * double(s_w) / double(s_out)); both paths. (The double-scale
      ConvPerChannel of newer LiteRT sources is 1 LSB off this build.)
  FULLY_CONNECTED: reference kernels: round(acc * double(s_in) * double(s_w) / double(s_out)), half away from
      zero. Default path: the same with an int64 bias; without a bias tensor (the converter drops an all-zero
      Dense bias) the ruy path: fixed-point multiplier, rounding with ties toward +inf.
  ADD: the general-rescaling ADD of int8 with a left shift of 15 instead of 20 (add.cc), int32 math; the
      default path rescales the inputs with one rounding instead of two (``add``).
  MEAN over H, W: reduce.cc's quantized mean (int32 fixed-point multiplier with 1/count folded in),
      clamped to int16.
  MAX_POOL_2D, AVERAGE_POOL_2D: the int8 arithmetic on int16 codes (same scale in and out).
  SOFTMAX: SoftmaxInt16 (exp over [-10, 0] and 1/(1+x) from 513-entry interpolated tables, gen_lut in
      double with libm exp), output scale 1/32768, zero point 0.

Sources read (LiteRT): ``tflite/kernels/internal/reference/integer_ops/{conv,fully_connected}.h``,
``reference/softmax.h``, ``internal/common.h``. Kernel signature as in ``mobileqat.ops``:
fn(xs, ins, out, **params) -> int16 array.
"""
import ctypes
import ctypes.util
import functools

import numpy as np

from mobileqat import integer
from mobileqat.ops import pooling

I16 = (-32768, 32767)


def activation_range(activation, scale, zero_point=0):
    """CalculateActivationRangeQuantized for an int16 output."""
    return integer.activation_range(activation, scale, zero_point, *I16)


def _requantize_double(acc, input_scale, filter_scales, output_scale):
    """reference_integer_ops ConvPerChannel (16x8) / FullyConnected with float scales: the int64
    accumulator times double(input_scale) * double(filter_scale) / double(output_scale), std::round,
    clamped to int32."""
    eff = (np.float64(np.float32(input_scale)) * np.asarray(filter_scales, np.float32).astype(np.float64)
           / np.float64(np.float32(output_scale)))
    v = np.asarray(acc, np.float64) * eff
    whole = np.trunc(v)
    r = whole + np.sign(v) * (np.abs(v - whole) >= 0.5)
    return np.clip(r, integer.INT32_MIN, integer.INT32_MAX).astype(np.int64)


def _requantize_fixed(acc, input_scale, filter_scales, output_scale):
    """MultiplyByQuantizedMultiplier(int64, ...) per channel with QuantizeMultiplier of
    double(input_scale) * double(filter_scale) / double(output_scale) (PopulateConvolutionQuantizationParams)."""
    fs = np.atleast_1d(np.asarray(filter_scales, np.float32))
    out = np.empty(np.shape(acc), np.int64)
    acc = np.asarray(acc, np.int64)
    for c in range(acc.shape[-1]):
        f = fs[c if fs.size > 1 else 0]
        m, shift = integer.quantize_multiplier(float(np.float64(np.float32(input_scale)) * np.float64(f)
                                                     / np.float64(np.float32(output_scale))))
        out[..., c] = integer._multiply_by_quantized_multiplier_int64(acc[..., c], m, shift)
    return out


def _requantize_ruy(acc, input_scale, filter_scales, output_scale):
    """The optimized builtin FULLY_CONNECTED (cpu_backend_gemm -> ruy): QuantizeMultiplier of
    double(float(input_scale * filter_scale)) / double(output_scale), (acc * m + 2^30) >> 31 on int32
    values, then a rounding right shift with ties toward +inf (as ``integer.fully_connected(kernel="ruy")``)."""
    fs = np.float32(np.atleast_1d(np.asarray(filter_scales, np.float32))[0])
    m, shift = integer.quantize_multiplier(float(np.float64(np.float32(np.float32(input_scale) * fs))
                                                 / np.float64(np.float32(output_scale))))
    left, right = max(shift, 0), max(-shift, 0)
    acc = integer._wrap32(np.asarray(acc, np.int64))
    high = integer._wrap32((integer._wrap32(acc << left) * m + (1 << 30)) >> 31)
    nudge = (1 << (right - 1)) if right > 0 else 0
    return np.where(high > integer.INT32_MAX - nudge, 1 << (31 - right), (high + nudge) >> right)


REQUANTIZE = {"double": _requantize_double, "fixed": _requantize_fixed, "ruy": _requantize_ruy}


def _finish(acc, ins, out, filter_scales, activation, requantize):
    y = REQUANTIZE[requantize](acc, ins[0][0], filter_scales, out[0]) + int(out[1])
    return np.clip(y, *activation_range(activation, out[0], out[1])).astype(np.int16)


def conv2d(xs, ins, out, weights, filter_scales, bias, stride, padding, activation=None, requantize="fixed"):
    """int16x8 CONV_2D: x (N, H, W, Cin) int16, weights (Cout, kh, kw, Cin) int8, bias (Cout,) int64."""
    acc = integer.conv_accumulators(np.asarray(xs[0], np.int64), 0, weights, bias, stride, padding)
    return _finish(acc, ins, out, filter_scales, activation, requantize)


def depthwise_conv2d(xs, ins, out, weights, filter_scales, bias, stride, padding, activation=None,
                     requantize="fixed"):
    """int16x8 DEPTHWISE_CONV_2D (depth multiplier 1): weights (1, kh, kw, C) int8."""
    acc = integer.depthwise_accumulators(np.asarray(xs[0], np.int64), 0, weights, bias, stride, padding)
    return _finish(acc, ins, out, filter_scales, activation, requantize)


def fully_connected(xs, ins, out, weights, filter_scales, bias, activation=None, requantize="double"):
    """int16x8 FULLY_CONNECTED: x (N, in) int16, weights (out, in) int8 per tensor, bias (out,) int64."""
    x = np.asarray(xs[0], np.int64)
    acc = integer._int_dot(x, np.asarray(weights, np.int64).T)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    return _finish(acc, ins, out, filter_scales, activation, requantize)


def _mbqm_single(x, multiplier, shift):
    """x * multiplier * 2^(shift - 31) with one rounding, ties toward +inf: (x * m + 2^(30 - shift)) >> (31 - shift)."""
    total = 31 - int(shift)
    return (np.asarray(x, np.int64) * multiplier + (np.int64(1) << (total - 1))) >> total


def add(xs, ins, out, activation=None, input_rounding="double"):
    """int16 ADD of two same-shape tensors, zero points 0, general scales (add.cc: left shift 15).

    input_rounding: how each input is brought to 2 * max(s1, s2): "double" (reference kernels:
    MultiplyByQuantizedMultiplier, two roundings) or "single" (the builtin kernel on the default path: one
    rounding, ties toward +inf; measured, 1 LSB apart on a few codes in 10^4). The sum is rescaled with
    two roundings on both."""
    (s1, z1), (s2, z2), (so, zo) = ins[0], ins[1], out
    f = lambda s: np.float64(np.float32(s))  # noqa: E731
    twice_max = 2.0 * max(f(s1), f(s2))
    m1, sh1 = integer.quantize_multiplier(f(s1) / twice_max)
    m2, sh2 = integer.quantize_multiplier(f(s2) / twice_max)
    mo, sho = integer.quantize_multiplier(twice_max / ((1 << 15) * f(so)))
    scale_input = integer.multiply_by_quantized_multiplier if input_rounding == "double" else _mbqm_single
    a = scale_input((np.asarray(xs[0], np.int64) - int(z1)) << 15, m1, sh1)
    b = scale_input((np.asarray(xs[1], np.int64) - int(z2)) << 15, m2, sh2)
    y = integer.multiply_by_quantized_multiplier(a + b, mo, sho) + int(zo)
    return np.clip(y, *activation_range(activation, so, zo)).astype(np.int16)


def mean_hw(xs, ins, out, keepdims=False, accumulator="int32"):
    """int16 MEAN over H and W (reduce.cc quantized mean), (N, H, W, C) -> (N, C) or (N, 1, 1, C)."""
    y = _mean(xs[0], ins[0], out, accumulator)
    return y.reshape(y.shape[0], 1, 1, y.shape[-1]) if keepdims else y


def _mean(x, inq, out, accumulator):
    x = np.asarray(x, np.int64)
    count = x.shape[1] * x.shape[2]
    multiplier, shift = integer.quantize_multiplier(float(np.float64(np.float32(inq[0])) /
                                                          np.float64(np.float32(out[0]))))
    fold = min(63 - (64 - int(count).bit_length()) if count else 0, 32, 31 + shift)
    multiplier = (multiplier << fold) // count
    shift -= fold
    total = x.sum(axis=(1, 2)) - int(inq[1]) * count
    if accumulator == "int64":
        y = integer._multiply_by_quantized_multiplier_int64(total, multiplier, shift)
    else:
        y = integer.multiply_by_quantized_multiplier(total, multiplier, shift)
    return np.clip(y + int(out[1]), *I16).astype(np.int16)


def max_pool2d(xs, ins, out, pool, stride, padding):
    """int16 MAX_POOL_2D: max of the raw codes in each window ('SAME' padding skipped); keeps the input's scale."""
    pooling._same_quantization("MAX_POOL_2D", ins, out)
    return pooling._windows(xs[0], pool, stride, padding, pad_value=-(1 << 20)).max(axis=(3, 4)).astype(np.int16)


def average_pool2d(xs, ins, out, pool, stride, padding):
    """int16 AVERAGE_POOL_2D: the int8 arithmetic (sum of raw codes over the window positions inside the input,
    divided by their count, round half away from zero) on int16 codes; keeps the input's scale."""
    pooling._same_quantization("AVERAGE_POOL_2D", ins, out)
    acc = pooling._windows(xs[0], pool, stride, padding, pad_value=0).sum(axis=(3, 4))
    count = pooling._windows(np.ones_like(xs[0]), pool, stride, padding, pad_value=0).sum(axis=(3, 4))
    half = count // 2
    y = np.where(acc > 0, (acc + half) // count, -((half - acc) // count))
    return np.clip(y, *I16).astype(np.int16)


# --- SOFTMAX (reference_ops::SoftmaxInt16) -----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _libm_exp():
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.exp.restype, libm.exp.argtypes = ctypes.c_double, [ctypes.c_double]
    return libm.exp


def _round(v):
    """TfLiteRound / std::round on a double: half away from zero."""
    return float(np.sign(v) * np.floor(abs(v) + 0.5))


def gen_lut(fn, input_min, input_max, output_min=-1.0, output_max=1.0):
    """gen_lut<double, int16_t, int16_t>: 512 interpolation anchors over [input_min, input_max], each biased
    by half its midpoint interpolation error, and a 513th for the last slope (common.h)."""
    steps = 512
    step = (input_max - input_min) / steps
    half = step / 2
    inv = 65536.0 / (output_max - output_min)
    lut = np.empty(steps + 1, np.int64)
    for i in range(steps):
        val, mid, nxt = fn(input_min + i * step), fn(input_min + i * step + half), fn(input_min + (i + 1) * step)
        sample = _round(val * inv)
        bias = _round((_round((nxt * inv + _round(val * inv)) / 2) - _round(mid * inv)) / 2)
        lut[i] = min(max(sample - bias, -32768.0), 32767.0)
    lut[steps] = min(max(_round(fn(input_max) * inv), -32768.0), 32767.0)
    return lut


@functools.lru_cache(maxsize=None)
def softmax_tables():
    """(exp table over [-10, 0], 1/(1+x) table over [0, 1]), as softmax.cc Prepare makes them for int16."""
    exp = _libm_exp()
    return gen_lut(exp, -10.0, 0.0), gen_lut(lambda v: 1.0 / (1.0 + v), 0.0, 1.0)


def lut_lookup(value, lut):
    """LUTLookup(int16_t): lut[256 + (v >> 7)] plus the slope to the next anchor times (v & 127) / 128, rounded."""
    v = np.asarray(value, np.int64)
    index = 256 + (v >> 7)
    base = lut[index]
    slope = lut[index + 1] - base
    return ((base + ((slope * (v & 0x7F) + 64) >> 7)) + 32768) % 65536 - 32768  # int16_t wrap


def softmax(xs, ins, out, beta=1.0):
    """int16 SOFTMAX over the last axis (SoftmaxInt16): output scale 1/32768, zero point 0."""
    if (np.float32(out[0]), int(out[1])) != (np.float32(1.0 / 32768), 0):
        raise ValueError(f"int16 SOFTMAX writes scale 1/32768 and zero point 0, the output tensor has "
                         f"{np.float32(out[0]):.9g}/{out[1]}")
    exp_lut, recip_lut = softmax_tables()
    m, shift = integer.quantize_multiplier(float(np.float32(np.float32(ins[0][0]) * np.float32(beta)))
                                           / (10.0 / 65535.0))
    x = np.asarray(xs[0], np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    scaled = integer.multiply_by_quantized_multiplier(diff, m, shift)
    e = lut_lookup(np.clip(scaled + 32767, -32768, 32767), exp_lut)
    total = e.sum(axis=-1, keepdims=True)
    clz = 32 - np.array([int(t).bit_length() for t in total.reshape(-1)], np.int64).reshape(total.shape)
    shifted = ((total << (clz - 1)) + (1 << 13)) >> 14
    recip = lut_lookup(np.clip(shifted - ((1 << 15) + (1 << 16)), -32768, 32767), recip_lut)
    right = 31 - clz
    y = (e * recip + (np.int64(1) << (right - 1))) >> right
    return np.clip(y, 0, 32767).astype(np.int16)


def _both(fn):
    return {"reference": fn, "xnnpack": fn}


def _add_builtin(xs, ins, out, **params):
    return add(xs, ins, out, **dict(params, input_rounding="single"))


def _fully_connected_builtin(xs, ins, out, **params):
    """The builtin int16 FULLY_CONNECTED: with an int64 bias it scales as the reference kernel does (double,
    std::round); without a bias tensor it runs through ruy (``_requantize_ruy``). Both measured."""
    bias = params.get("bias")
    return fully_connected(xs, ins, out, **dict(params, requantize="ruy" if bias is None else "double"))


KERNELS = {"conv2d_i16": _both(conv2d), "depthwise_conv2d_i16": _both(depthwise_conv2d),
           "fully_connected_i16": {"reference": fully_connected, "xnnpack": _fully_connected_builtin}, "add_i16": {"reference": add, "xnnpack": _add_builtin}, "mean_hw_i16": _both(mean_hw),
           "softmax_i16": _both(softmax), "max_pool2d_i16": _both(max_pool2d),
           "average_pool2d_i16": _both(average_pool2d)}
