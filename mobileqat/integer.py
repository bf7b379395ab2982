"""TFLite's integer arithmetic in numpy, bit for bit with the reference kernels.

The pieces of lite/kernels/internal/common.{h,cc} (double-rounding build, the default):
  quantize_multiplier(m)                  real multiplier -> (int32 mantissa Q0.31, shift)
  multiply_by_quantized_multiplier(x,...) SaturatingRoundingDoublingHighMul + RoundingDivideByPOT
and whole ops built on them (conv2d, depthwise_conv2d) that take int8 tensors and the quantization
parameters read from a .tflite. Used to check single ops against the interpreter, and the basis of
an integer-exact evaluation path.
"""
import math

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def quantize_multiplier(m):
    """TFLite QuantizeMultiplier: real m >= 0 -> (mantissa int32 in [2^30, 2^31), shift) with
    m ~= mantissa * 2^(shift - 31)."""
    if m == 0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = int(math.floor(abs(q) * (1 << 31) + 0.5))  # std::round, q > 0
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def _saturating_rounding_doubling_high_mul(a, b):
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C++ division truncates toward zero
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def _rounding_divide_by_pot(x, exponent):
    x, exponent = np.asarray(x, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """x * multiplier * 2^(shift-31) with TFLite's rounding (int32 in, int32 out, elementwise)."""
    shift = np.asarray(shift, np.int64)
    left = np.where(shift > 0, shift, 0)
    right = np.where(shift > 0, 0, -shift)
    x = np.asarray(x, np.int64) * (np.int64(1) << left)
    return _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(x, multiplier), right)


def activation_range(activation, scale, zero_point, qmin=-128, qmax=127):
    """CalculateActivationRangeQuantized: the integer clamp of a fused activation."""
    def q(v):
        return zero_point + int(np.floor(v / scale + 0.5)) if v >= 0 else zero_point + int(-np.floor(-v / scale + 0.5))
    if activation == "RELU":
        return max(qmin, q(0.0)), qmax
    if activation == "RELU6":
        return max(qmin, q(0.0)), min(qmax, q(6.0))
    if activation == "RELU_N1_TO_1":
        return max(qmin, q(-1.0)), min(qmax, q(1.0))
    return qmin, qmax


def _same_padding(size, k, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2


def _patches(x, kh, kw, stride, padding, pad_value):
    """(N, H, W, C) -> (N, OH, OW, kh, kw, C) windows; padding 'SAME' or 'VALID'."""
    n, h, w, c = x.shape
    if padding == "SAME":
        oh, top = _same_padding(h, kh, stride[0])
        ow, left = _same_padding(w, kw, stride[1])
    else:
        oh, ow, top, left = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1, 0, 0
    ph = max((oh - 1) * stride[0] + kh - h - top, 0)
    pw = max((ow - 1) * stride[1] + kw - w - left, 0)
    xp = np.pad(x, ((0, 0), (top, ph), (left, pw), (0, 0)), constant_values=pad_value)
    idx_h = (np.arange(oh) * stride[0])[:, None] + np.arange(kh)[None]
    idx_w = (np.arange(ow) * stride[1])[:, None] + np.arange(kw)[None]
    return xp[:, idx_h[:, None, :, None], idx_w[None, :, None, :], :]


def _requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, act_min, act_max):
    mults = [quantize_multiplier(float(np.float64(input_scale) * np.float64(fs) / np.float64(output_scale)))
             for fs in np.broadcast_to(filter_scales, (acc.shape[-1],))]
    m = np.array([a for a, _ in mults], np.int64)
    s = np.array([b for _, b in mults], np.int64)
    out = multiply_by_quantized_multiplier(acc, m, s) + output_zero_point
    return np.clip(out, act_min, act_max).astype(np.int8)


def conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
           stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 CONV_2D (per-channel). x (N,H,W,Cin) int8; w (Cout,kh,kw,Cin) int8 as TFLite
    stores it; bias (Cout,) int32 at scale input_scale*filter_scale. Returns (N,OH,OW,Cout) int8."""
    cout, kh, kw, _ = w.shape
    # padded positions hold the zero point, i.e. contribute (zp - zp) * w = 0, as the kernel skips them
    p = _patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    acc = np.einsum("nhwijc,oijc->nhwo", p, np.asarray(w, np.int64)) + np.asarray(bias, np.int64)
    return _requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, *act_range)


def depthwise_conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale,
                     output_zero_point, stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 DEPTHWISE_CONV_2D, depth multiplier 1. w (1,kh,kw,C) int8 as TFLite stores it."""
    _, kh, kw, c = w.shape
    p = _patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    acc = np.einsum("nhwijc,ijc->nhwc", p, np.asarray(w[0], np.int64)) + np.asarray(bias, np.int64)
    return _requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, *act_range)


def add(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
        act_range=(-128, 127), left_shift=20):
    """Reference int8 ADD with general rescaling (inputs of different scales), same shapes.

    Each input is shifted left by 20 bits and brought to the scale 2*max(s1, s2) with its own
    fixed-point multiplier; the sum is brought to the output scale with a third (add.cc Prepare)."""
    twice_max = 2.0 * max(np.float64(np.float32(scale1)), np.float64(np.float32(scale2)))
    m1, s1 = quantize_multiplier(np.float64(np.float32(scale1)) / twice_max)
    m2, s2 = quantize_multiplier(np.float64(np.float32(scale2)) / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * np.float64(np.float32(output_scale))))
    a = multiply_by_quantized_multiplier((np.asarray(x1, np.int64) - zero_point1) << left_shift, m1, s1)
    b = multiply_by_quantized_multiplier((np.asarray(x2, np.int64) - zero_point2) << left_shift, m2, s2)
    out = multiply_by_quantized_multiplier(a + b, mo, so) + output_zero_point
    return np.clip(out, *act_range).astype(np.int8)


def _multiply_by_quantized_multiplier_int64(x, multiplier, shift):
    """The int64-input overload: a 16-bit multiplier and one rounding (common.cc)."""
    reduced = (multiplier + (1 << 15)) >> 16 if multiplier < 0x7FFF0000 else 0x7FFF
    total_shift = 15 - shift
    return (np.asarray(x, np.int64) * reduced + (np.int64(1) << (total_shift - 1))) >> total_shift


def mean_hw(x, input_scale, input_zero_point, output_scale, output_zero_point, accumulator="int32"):
    """Reference int8 MEAN over H and W, (N, H, W, C) -> (N, C) (reduce.h QuantizedMeanOrSum): the sum
    minus zero points, times input/output scale with 1/count folded into the fixed-point multiplier."""
    x = np.asarray(x, np.int64)
    count = x.shape[1] * x.shape[2]
    multiplier, shift = quantize_multiplier(float(np.float64(np.float32(input_scale)) /
                                                  np.float64(np.float32(output_scale))))
    fold = min(63 - (64 - int(count).bit_length()) if count else 0, 32, 31 + shift)  # 63 - clz(count)
    multiplier = (multiplier << fold) // count
    shift -= fold
    total = x.sum(axis=(1, 2)) - input_zero_point * count
    if accumulator == "int64":
        out = _multiply_by_quantized_multiplier_int64(total, multiplier, shift)
    else:
        out = multiply_by_quantized_multiplier(total, multiplier, shift)
    return np.clip(out + output_zero_point, -128, 127).astype(np.int8)
