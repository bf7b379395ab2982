"""LiteRT's default CPU path (XNNPACK delegate) in numpy, bit for bit, for int8 models.

Drop-in twin of ``mobileqat.integer`` (same function names and signatures): swap the module to get
what ``Interpreter(..., experimental_op_resolver_type=OpResolverType.AUTO)`` computes instead of
what the reference kernels compute. Checked against ai-edge-litert 2.3 on x86-64 (AVX512-VNNI);
sources read: LiteRT ``tflite/delegates/xnnpack/xnnpack_delegate.cc`` and XNNPACK
``src/operators/{convolution-nhwc,fully-connected-nc,binary-elementwise-nd,reduce-nd}.c``,
``src/microparams-init.c``, ``src/xnnpack/requantization.h``, ``src/reference/unary-elementwise.cc``,
``src/subgraph/{convolution-2d,fully-connected}.c`` and the qs8 gemm/dwconv/vadd microkernels.

Delegated int8 ops and their arithmetic:
  CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED ("fp32" requantization, one rounding):
      scale_c = fl(fl(input_scale * filter_scale_c) / output_scale)          (float32)
      y = clamp(rint_half_even(fl(float32(acc) * scale_c)) + output_zp, act_min, act_max)
    acc = bias + sum((x - input_zp) * w) in int32, exactly as the reference kernels; padding
    contributes nothing. FULLY_CONNECTED's per-tensor filter scale is replicated per channel.
  fused activations: the delegate passes float bounds (RELU6 -> [0, 6]) and XNNPACK quantizes them
    with lrintf(fl(bound / scale) + zp) clamped to [-128, 127] (``activation_range`` here).
  ADD (xnn_init_qs8_add_minmax_scalar_params): integer only, no fixed-point high-mul:
      a = fl(s1 / so), b = fl(s2 / so); shift = 20 - exponent(max(a, b));
      ma = lrintf(a * 2^shift), mb = lrintf(b * 2^shift);
      y = clamp(((2^(shift-1) - ma*z1 - mb*z2 + ma*x1 + mb*x2) >> shift) + zo)   (floor shift)
    Only for input/output scale ratios in [1/1024, 256); other ADDs run on the builtin optimized kernel
    (``add_builtin``).
  MEAN (reduce-nd.c, qs8 rsum + reference int32->qs8 convert):
      m = fl(fl(si / so) * fl(1 / count)); b = fl(zo - fl(fl(count * zi) * m))
      y = clamp(rint_half_even(fl(fl(float32(sum x) * m) + b)))
Not delegated: int8 SOFTMAX (the delegate takes float softmax only); it runs on the builtin
optimized kernel (float exp lookup table), reproduced by ``softmax`` below.
"""
import numpy as np

from mobileqat.integer import (_PLANS, _binary_by_table, _conv_sums, _exact_dot, _fc_weights, _folded_bias, _key,
                               _scratch, _weights_plan, _widen, conv_groups, softmax_lut)
from mobileqat.integer import conv_accumulators, depthwise_accumulators  # noqa: F401 (same accumulators)

F32 = np.float32


def _f32(v):
    return np.asarray(v, dtype=np.float32)


def quantize_bound(value, scale, zero_point):
    """xnn_qs8_quantize: lrintf(clamp(fl(value / scale) + zero_point, -128, 127)) in float32."""
    v = F32(F32(value) / F32(scale)) + F32(zero_point)
    return int(np.rint(min(max(v, F32(-128.0)), F32(127.0))))


def activation_range(activation, scale, zero_point, qmin=-128, qmax=127):
    """The integer clamp XNNPACK derives for a fused activation (float bounds quantized with
    ``quantize_bound``), same signature as ``integer.activation_range``."""
    bounds = {"RELU": (0.0, np.inf), "RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
    lo, hi = bounds.get(activation, (-np.inf, np.inf))
    return max(qmin, quantize_bound(lo, scale, zero_point)), min(qmax, quantize_bound(hi, scale, zero_point))


def requantization_scales(input_scale, filter_scales, output_scale, channels):
    """fl(fl(input_scale * filter_scale) / output_scale) per output channel, float32 as XNNPACK."""
    fs = np.broadcast_to(_f32(filter_scales), (channels,))
    return (F32(input_scale) * fs) / F32(output_scale)


def requantize_fp32(acc, scales, output_zero_point, act_min=-128, act_max=127):
    """XNNPACK fp32 requantization of int32 accumulators (last axis = channel): float32 multiply,
    round half to even (cvtps2dq / lrintf), add the zero point, clamp."""
    acc = np.asarray(acc, np.int64).astype(np.int32)  # int32 wrap-around, like the kernels
    y = np.rint(acc.astype(np.float32) * _f32(scales))
    out = y.astype(np.int64) + int(output_zero_point)
    return np.clip(out, act_min, act_max).astype(np.int8)


def _fp32_plan(input_scale, filter_scales, output_scale, folded, output_zero_point, act_min, act_max):
    """Per-channel constants of ``requantize_fp32`` for accumulators sum(x * w) + folded (int64 per channel).
    float32 sums plus float32(folded) round to float32(acc) (both exact, one rounding of the exact sum, as
    the int32 -> float32 conversion) when folded is a float32 integer and acc cannot wrap int32."""
    folded = np.asarray(folded, np.int64)
    folded32 = folded.astype(np.float32)
    fast = bool(np.all(folded32.astype(np.int64) == folded)) and int(np.abs(folded).max(initial=0)) < 2 ** 30
    return dict(scales=requantization_scales(input_scale, filter_scales, output_scale, len(folded)).astype(F32),
                folded=folded, folded32=folded32, zero_point=int(output_zero_point), lo=int(act_min), hi=int(act_max),
                fast=fast)


def _requantize_fp32_block(sums, plan, out, k=1):
    """``requantize_fp32`` of one block of accumulators sums (P, C) + plan['folded'], written into out (P, C)
    (k: see ``mobileqat.integer._conv_sums``)."""
    if not (plan["fast"] and sums.dtype == np.float32):  # float32 sums are exact: _conv_sums checks it
        acc = np.asarray(sums).astype(np.int64) + plan["folded"]
        out[...] = requantize_fp32(acc, plan["scales"], plan["zero_point"], plan["lo"], plan["hi"])
        return
    sums, out, vector = _widen(sums, out, plan, k)
    y = np.add(sums, vector("folded32"), out=_scratch("y32", sums.shape, np.float32))  # = float32(acc)
    y *= vector("scales")
    np.rint(y, out=y)
    y += F32(plan["zero_point"])  # inexact only far outside [-128, 127], where the clamp decides anyway
    np.clip(y, plan["lo"], plan["hi"], out=y)
    np.copyto(out, y, casting="unsafe")


def _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point, stride,
             padding, act_range, depthwise):
    wp = _weights_plan(w, depthwise, 1 if depthwise else conv_groups(x, w))

    def build():
        return _fp32_plan(input_scale, filter_scales, output_scale, _folded_bias(wp, bias, input_zero_point),
                          output_zero_point, *act_range)
    plan = _PLANS.get((bias, filter_scales), _key("fp32", wp["serial"], input_scale, input_zero_point, output_scale,
                                                  output_zero_point, tuple(act_range)), build)
    return _conv_sums(x, input_zero_point, wp, stride, padding,
                      lambda a, o, k: _requantize_fp32_block(a, plan, o, k), np.int8)


def conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
           stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """XNNPACK int8 CONV_2D (qs8 input, per-channel qc8w filter). x (N,H,W,Cin) int8; w
    (Cout,kh,kw,Cin/groups) int8 (grouped: one XNNPACK convolution with that many groups); bias (Cout,) int32.
    Returns (N,OH,OW,Cout) int8. The accumulators of
    ``conv_accumulators`` through ``requantize_fp32``, block by block (``mobileqat.integer._conv_sums``)."""
    return _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
                    stride, padding, act_range, depthwise=False)


def depthwise_conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale,
                     output_zero_point, stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """XNNPACK int8 DEPTHWISE_CONV_2D, depth multiplier 1. w (1,kh,kw,C) int8."""
    return _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
                    stride, padding, act_range, depthwise=True)


def fully_connected(x, input_scale, input_zero_point, w, filter_scale, bias, output_scale,
                    output_zero_point, act_range=(-128, 127)):
    """XNNPACK int8 FULLY_CONNECTED. x (N,in) int8, w (out,in) int8 (per-tensor or per-channel
    scale), bias (out,) int32 or None. Returns (N,out) int8."""
    fc = _fc_weights(w)
    acc = _exact_dot(np.asarray(x, np.int64) - input_zero_point, fc["wT"])
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    scales = requantization_scales(input_scale, filter_scale, output_scale, fc["w"].shape[0])
    return requantize_fp32(acc, scales, output_zero_point, *act_range)


def add_params(scale1, zero_point1, scale2, zero_point2, output_scale):
    """xnn_init_qs8_add_minmax_scalar_params: (a_multiplier, b_multiplier, shift, bias)."""
    a = F32(F32(scale1) / F32(output_scale))
    b = F32(F32(scale2) / F32(output_scale))
    if not all(F32(1 / 1024) <= r < F32(256) for r in (a, b)):
        raise ValueError(f"ADD input/output scale ratios {a:.6g}, {b:.6g} are outside XNNPACK's [1/1024, 256): "
                         "the delegate leaves this ADD to the builtin optimized kernel, whose int8 ADD saturates "
                         "differently from the reference kernel; mobileqat does not reproduce it")
    exponent = int((int(np.float32(max(a, b)).view(np.uint32)) >> 23) - 127)
    shift = 20 - exponent
    ma = int(np.rint(np.ldexp(a, shift).astype(np.float32)))  # exponent bump, then lrintf
    mb = int(np.rint(np.ldexp(b, shift).astype(np.float32)))
    bias = (1 << (shift - 1)) - ma * int(zero_point1) - mb * int(zero_point2)
    return ma, mb, shift, bias


def _add(x1, x2, scale1, zero_point1, scale2, zero_point2, output_scale, output_zero_point, act_range):
    ma, mb, shift, bias = add_params(scale1, zero_point1, scale2, zero_point2, output_scale)
    acc = bias + ma * np.asarray(x1, np.int64) + mb * np.asarray(x2, np.int64)
    acc = acc.astype(np.int32).astype(np.int64) >> shift  # int32 wrap, arithmetic shift
    out = np.clip(acc + int(output_zero_point), -128, 127)
    return np.clip(out, *act_range).astype(np.int8)


def add_delegated(scale1, scale2, output_scale):
    """True when XNNPACK takes this int8 ADD: both input/output scale ratios in [1/1024, 256)."""
    return all(F32(1 / 1024) <= F32(F32(s) / F32(output_scale)) < F32(256) for s in (scale1, scale2))


def _vqrdmulh(a, b):
    """ARM VQRDMULH (and NEON_2_SSE's emulation): sat32((2*a*b + 2^31) >> 32), round half up."""
    a = np.asarray(a, np.int64)
    return np.where((a == -2 ** 31) & (b == -2 ** 31), 2 ** 31 - 1, (2 * a * int(b) + (1 << 31)) >> 32)


def _wrap(x, bits):
    half = 1 << (bits - 1)
    return ((np.asarray(x, np.int64) + half) & ((1 << bits) - 1)) - half


def _builtin_add_vector(x1, x2, scale1, zero_point1, scale2, zero_point2, output_scale, output_zero_point,
                        act_range):
    """optimized_integer_ops::AddElementwiseInt8's 16-lane loop (NEON, NEON_2_SSE on x86)."""
    from mobileqat.integer import _rounding_divide_by_pot, quantize_multiplier
    twice_max = 2.0 * max(np.float64(F32(scale1)), np.float64(F32(scale2)))
    m1, s1 = quantize_multiplier(np.float64(F32(scale1)) / twice_max)
    m2, s2 = quantize_multiplier(np.float64(F32(scale2)) / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << 20) * np.float64(F32(output_scale))))

    def scaled(x, zero_point, m, s):
        v = np.asarray(x, np.int64) - zero_point
        k = 20 + s  # vshlq_s32: a negative count shifts right (arithmetic, truncating)
        v = _wrap(v << k, 32) if k >= 0 else v >> -k
        return _vqrdmulh(v, m)

    total = _wrap(scaled(x1, zero_point1, m1, s1) + scaled(x2, zero_point2, m2, s2), 32)
    y = _rounding_divide_by_pot(_vqrdmulh(total, mo), -so)
    y = _wrap(_wrap(y, 16) + int(output_zero_point), 16)  # vmovn_s32 truncates, the int16 add wraps
    return np.clip(np.clip(y, -128, 127), *act_range).astype(np.int8)  # vqmovn_s16, then the clamp


def add_builtin(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
                act_range=(-128, 127)):
    """The builtin optimized int8 ADD (add.cc kGenericOptimized -> optimized_integer_ops::Add), which
    runs the ADDs XNNPACK refuses, same shapes (N, ...). AddElementwiseInt8 walks the flat tensor: whole
    blocks of 16 elements take the vector loop (NEON; NEON_2_SSE on x86), whose rounding differs from
    the reference kernel (input shift folded before a round-half-up VQRDMULH) and whose int32 -> int16
    narrowing wraps; the last ``size % 16`` elements take the scalar loop, the reference arithmetic. So
    the result depends on how many images one invoke holds when an image's size is not a multiple of 16:
    this assumes the runtime was invoked on exactly the batch given here. ``act_range`` as
    ``integer.activation_range`` computes it (the builtin kernel's clamp)."""
    from mobileqat import integer
    params = (scale1, zero_point1, scale2, zero_point2, output_scale, output_zero_point, tuple(act_range))
    x1, x2 = np.asarray(x1, np.int8), np.asarray(x2, np.int8)
    if x1.shape != x2.shape:
        raise ValueError(f"broadcast ADD {x1.shape} + {x2.shape} with scale ratios outside XNNPACK's [1/1024, 256) "
                         "runs on the builtin broadcast kernel, which mobileqat does not reproduce")
    y = _binary_by_table(_builtin_add_vector, x1, x2, params).reshape(-1)
    tail = x1.size % 16
    if tail:
        y[-tail:] = integer.add(x1.reshape(-1)[-tail:], scale1, zero_point1, x2.reshape(-1)[-tail:], scale2,
                                zero_point2, output_scale, output_zero_point, act_range)
    return y.reshape(x1.shape)


def add(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
        act_range=(-128, 127)):
    """XNNPACK int8 ADD (qs8 vadd), same shapes. A fused activation is a separate clamp. int8 inputs are
    looked up in a table of all 65,536 input pairs computed this way. Scale ratios the delegate refuses
    go to ``add_builtin`` (what the runtime then runs)."""
    if not add_delegated(scale1, scale2, output_scale):
        return add_builtin(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
                           act_range)
    return _binary_by_table(_add, x1, x2, (scale1, zero_point1, scale2, zero_point2, output_scale,
                                           output_zero_point, tuple(act_range)))


def mean_params(count, input_scale, input_zero_point, output_scale, output_zero_point):
    """(multiplier, float zero point) of XNNPACK's qs8 MEAN: int32 sum -> int8."""
    m = F32(F32(F32(input_scale) / F32(output_scale)) * F32(F32(1.0) / F32(count)))
    b = F32(F32(output_zero_point) - F32(F32(F32(count) * F32(input_zero_point)) * m))
    return m, b


def mean_hw(x, input_scale, input_zero_point, output_scale, output_zero_point):
    """XNNPACK int8 MEAN over H and W, (N, H, W, C) -> (N, C)."""
    x = np.asarray(x, np.int64)
    count = x.shape[1] * x.shape[2]
    m, b = mean_params(count, input_scale, input_zero_point, output_scale, output_zero_point)
    total = x.sum(axis=(1, 2)).astype(np.int32).astype(np.float32)
    y = np.rint((total * m) + b)  # two float32 roundings (no FMA), then nearbyint
    return np.clip(y, -128, 127).astype(np.int8)


# XNNPACK does not take int8 SOFTMAX: it runs on the builtin optimized kernel (float exp table).
softmax = softmax_lut
