"""TFLite's integer arithmetic in numpy, bit for bit with the reference kernels.

The pieces of lite/kernels/internal/common.{h,cc} (double-rounding build, the default):
  quantize_multiplier(m)                  real multiplier -> (int32 mantissa Q0.31, shift)
  multiply_by_quantized_multiplier(x,...) SaturatingRoundingDoublingHighMul + RoundingDivideByPOT
and whole ops built on them (conv2d, depthwise_conv2d) that take int8 tensors and the quantization
parameters read from a .tflite. Used to check single ops against the interpreter, and the basis of
an integer-exact evaluation path.
"""
import functools
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


def _exact_dot(a, b):
    """Integer matrix product through float64 BLAS: exact while every partial sum stays below 2^53,
    i.e. for int8 x int8 products with fewer than 2^38 terms."""
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(np.int64)


def conv_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    """int32 accumulators of int8 CONV_2D: bias + sum((x - zp) * w), (N,OH,OW,Cout) int64. Padded positions
    hold the zero point, i.e. contribute (zp - zp) * w = 0, as the kernels skip them."""
    cout, kh, kw, _ = w.shape
    p = _patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    return _exact_dot(p.reshape(p.shape[:3] + (-1,)), np.asarray(w).reshape(cout, -1).T) + np.asarray(bias, np.int64)


def depthwise_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    """int32 accumulators of int8 DEPTHWISE_CONV_2D, depth multiplier 1, w (1,kh,kw,C): (N,OH,OW,C) int64."""
    _, kh, kw, c = w.shape
    p = _patches(np.asarray(x, np.int64), kh, kw, stride, padding, input_zero_point) - input_zero_point
    acc = np.einsum("nhwijc,ijc->nhwc", p.astype(np.float64), np.asarray(w[0], np.float64)).astype(np.int64)
    return acc + np.asarray(bias, np.int64)  # float64 sums of int8 products are exact (|acc| < 2^53)


def conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
           stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 CONV_2D (per-channel). x (N,H,W,Cin) int8; w (Cout,kh,kw,Cin) int8 as TFLite
    stores it; bias (Cout,) int32 at scale input_scale*filter_scale. Returns (N,OH,OW,Cout) int8."""
    acc = conv_accumulators(x, input_zero_point, w, bias, stride, padding)
    return _requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, *act_range)


def depthwise_conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale,
                     output_zero_point, stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 DEPTHWISE_CONV_2D, depth multiplier 1. w (1,kh,kw,C) int8 as TFLite stores it."""
    acc = depthwise_accumulators(x, input_zero_point, w, bias, stride, padding)
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


def _wrap32(x):
    """int64 values -> int32 two's-complement wraparound (C++ int32 overflow as the hardware does it)."""
    return ((np.asarray(x, np.int64) + 2 ** 31) & 0xFFFFFFFF) - 2 ** 31


def _round_half_away(v):
    """std::round: to nearest, ties away from zero, exact for any float (no v + 0.5 rounding)."""
    v = np.asarray(v, np.float64)
    whole = np.trunc(v)
    return (whole + np.sign(v) * (np.abs(v - whole) >= 0.5)).astype(np.int64)


def fully_connected(x, input_scale, input_zero_point, w, filter_scale, bias, output_scale, output_zero_point,
                    act_range=(-128, 127), kernel="reference"):
    """int8 FULLY_CONNECTED, per-tensor weights. x (N, in) int8; w (out, in) int8 as TFLite stores it
    (zero point 0); filter_scale a scalar or length-1 array; bias (out,) int32 at scale
    input_scale*filter_scale, or None. Returns (N, out) int8.

    kernel="reference" (BUILTIN_REF): reference_integer_ops::FullyConnected with float scales, the
    int32 accumulator times double(input_scale)*double(filter_scale)/double(output_scale), std::round
    (ties away from zero). No fixed-point multiplier.
    kernel="ruy" (the optimized builtin kernel on x86: cpu_backend_gemm -> ruy AVX2/AVX-512): the
    multiplier of fully_connected.cc Prepare (GetQuantizedConvolutionMultipler: the scale product in
    float32, the division in double; QuantizeMultiplier), applied as ruy does: (acc * m + 2^30) >> 31,
    then a rounding right shift with ties toward +inf."""
    fs = np.asarray(filter_scale, np.float32).reshape(-1)
    if fs.size != 1:
        raise ValueError(f"fully_connected takes per-tensor weights (one filter scale), got {fs.size} scales")
    fs, si, so = fs[0], np.float32(input_scale), np.float32(output_scale)
    w = np.asarray(w, np.int64)
    acc = np.asarray(x, np.int64) @ w.T - input_zero_point * w.sum(axis=1)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    acc = _wrap32(acc)  # the int32 accumulator
    if kernel == "reference":
        out = _round_half_away(acc.astype(np.float64) * (np.float64(si) * np.float64(fs) / np.float64(so)))
    elif kernel == "ruy":
        m, shift = quantize_multiplier(float(np.float64(np.float32(si * fs)) / np.float64(so)))
        left, right = max(shift, 0), max(-shift, 0)
        high = _wrap32((_wrap32(acc << left) * m + (1 << 30)) >> 31)
        nudge = (1 << (right - 1)) if right > 0 else 0
        out = np.where(high > INT32_MAX - nudge, 1 << (31 - right), (high + nudge) >> right)
    else:
        raise ValueError(f"kernel must be 'reference' or 'ruy', not {kernel!r}")
    return np.clip(out + output_zero_point, *act_range).astype(np.int8)


# gemmlowp fixedpoint/fixedpoint.h on int32 raw values carried in numpy int64 arrays. FixedPoint<int32, I>
# has 31 - I fractional bits; '*' is SaturatingRoundingDoublingHighMul, '+'/'-' wrap (no saturation).


def _saturating_rounding_multiply_by_pot(x, exponent):
    """SaturatingRoundingMultiplyByPOT<exponent>: saturating << for exponent > 0, rounding >> for < 0."""
    x = np.asarray(x, np.int64)
    if exponent == 0:
        return x
    if exponent < 0:
        return _rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    return np.where(x > threshold, INT32_MAX, np.where(x < -threshold, INT32_MIN, x << exponent))


def _rescale(x, src_integer_bits, dst_integer_bits):
    """gemmlowp::Rescale<dst>(FixedPoint<int32, src>)."""
    return _saturating_rounding_multiply_by_pot(x, src_integer_bits - dst_integer_bits)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    """exp(a) for a in [-1/4, 0), Q0.31 -> Q0.31: Taylor expansion around -1/8."""
    mul = _saturating_rounding_doubling_high_mul
    constant_term, constant_1_over_3 = 1895147668, 715827883  # exp(-1/8), 1/3
    x = _wrap32(a + (1 << 28))
    x2 = mul(x, x)
    x3 = mul(x2, x)
    x4 = mul(x2, x2)
    x4_over_4 = _saturating_rounding_multiply_by_pot(x4, -2)
    poly = _saturating_rounding_multiply_by_pot(_wrap32(mul(_wrap32(x4_over_4 + x3), constant_1_over_3) + x2), -1)
    return _wrap32(constant_term + mul(constant_term, _wrap32(x + poly)))


def _exp_on_negative_values(a, integer_bits):
    """gemmlowp exp_on_negative_values: FixedPoint<int32, integer_bits> a <= 0 -> exp(a) in Q0.31."""
    fractional_bits = 31 - integer_bits
    a = np.asarray(a, np.int64)
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = _wrap32((a & (one_quarter - 1)) - one_quarter)
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        _rescale(a_mod_quarter_minus_one_quarter, integer_bits, 0))
    remainder = _wrap32(a_mod_quarter_minus_one_quarter - a)
    # the barrel shifter: exp(-2^e) factors, Q0.31
    for exponent, multiplier in ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308),
                                 (2, 39332535), (3, 720401), (4, 242)):
        if integer_bits > exponent:
            bit = remainder & (1 << (fractional_bits + exponent))
            result = np.where(bit != 0, _saturating_rounding_doubling_high_mul(result, multiplier), result)
    if integer_bits > 5:
        result = np.where(a < -(1 << (36 - integer_bits)), 0, result)  # clamp at -32
    return np.where(a == 0, INT32_MAX, result)


def _one_over_one_plus_x_for_x_in_0_1(a):
    """gemmlowp one_over_one_plus_x_for_x_in_0_1: Q0.31 in [0, 1) -> 1/(1+a) in Q0.31, by three
    Newton-Raphson steps in Q2.29."""
    mul = _saturating_rounding_doubling_high_mul
    a = np.asarray(a, np.int64)
    s = a + INT32_MAX  # RoundingHalfSum(a, One): (sum + sign) / 2, truncating
    half_denominator = np.where(s >= 0, (s + 1) // 2, -((-(s - 1)) // 2))
    constant_48_over_17, constant_neg_32_over_17, one_q2 = 1515870810, -1010580540, 1 << 29
    x = _wrap32(constant_48_over_17 + mul(half_denominator, constant_neg_32_over_17))
    for _ in range(3):
        half_denominator_times_x = mul(half_denominator, x)
        one_minus_half_denominator_times_x = _wrap32(one_q2 - half_denominator_times_x)
        x = _wrap32(x + _rescale(mul(x, one_minus_half_denominator_times_x), 4, 2))
    return _rescale(x, 1, 0)  # Rescale<0>(ExactMulByPot<-1>(x))


def _count_leading_zeros32(x):
    x = np.asarray(x, np.int64) & 0xFFFFFFFF
    bits = np.zeros(x.shape, np.int64)
    for b in range(32):
        bits = np.where(x >= (np.int64(1) << b), b + 1, bits)
    return 32 - bits


def _get_reciprocal(x, x_integer_digits):
    """common.h GetReciprocal: (Q0.31 1/x normalised into [1/2, 1), num_bits_over_unit)."""
    headroom_plus_one = _count_leading_zeros32(x)
    num_bits_over_unit = x_integer_digits - headroom_plus_one
    shifted = ((np.asarray(x, np.int64) << headroom_plus_one) & 0xFFFFFFFF) - (1 << 31)
    return _one_over_one_plus_x_for_x_in_0_1(shifted), num_bits_over_unit


def softmax_params(input_scale, beta=1.0, scaled_diff_integer_bits=5):
    """activations.cc SoftmaxPrepare (kReference): (input_beta_multiplier, input_left_shift, diff_min),
    from PreprocessSoftmaxScaling and CalculateInputRadius (quantization_util.cc), in double."""
    real = min(np.float64(np.float32(beta)) * np.float64(np.float32(input_scale))
               * (1 << (31 - scaled_diff_integer_bits)), (1 << 31) - 1.0)
    multiplier, left_shift = quantize_multiplier(float(real))
    radius = math.floor(1.0 * ((1 << scaled_diff_integer_bits) - 1)
                        * (1 << (31 - scaled_diff_integer_bits)) / (1 << left_shift))
    return multiplier, left_shift, -radius


def softmax(x, input_scale, input_zero_point, beta=1.0, output_zero_point=-128):
    """Reference int8 SOFTMAX over the last axis (reference_ops::Softmax, reference/softmax.h): output
    scale 1/256, zero point -128. x (..., classes) int8 -> int8.

    Each difference to the row max (>= diff_min) is scaled by beta*input_scale into Q5.26
    (MultiplyByQuantizedMultiplierGreaterThanOne), exponentiated with gemmlowp's fixed-point
    exp_on_negative_values, summed in Q12.19; the sum's reciprocal (GetReciprocal) times each exp is
    rounding-shifted to 8 bits. input_zero_point cancels out (only differences are used); the output
    zero point must be -128, as SoftmaxPrepare requires."""
    del input_zero_point
    if output_zero_point != -128:
        raise ValueError(f"int8 SOFTMAX has output zero point -128, not {output_zero_point}")
    multiplier, left_shift, diff_min = softmax_params(input_scale, beta)
    x = np.asarray(x, np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    keep = diff >= diff_min
    # MultiplyByQuantizedMultiplierGreaterThanOne (double rounding): SRDHM(diff * 2^left_shift, m)
    rescaled = _saturating_rounding_doubling_high_mul(_wrap32(np.where(keep, diff, 0) << left_shift), multiplier)
    exps = np.where(keep, _exp_on_negative_values(rescaled, 5), 0)
    sum_of_exps = _wrap32(np.where(keep, _rescale(exps, 0, 12), 0).sum(axis=-1, keepdims=True))
    shifted_scale, num_bits_over_unit = _get_reciprocal(sum_of_exps, 12)
    exponent = num_bits_over_unit + 31 - 8
    unsat = _rounding_divide_by_pot(_saturating_rounding_doubling_high_mul(shifted_scale, exps), exponent)
    out = np.clip(unsat - 128, -128, 127)
    return np.where(keep, out, -128).astype(np.int8)


@functools.lru_cache(maxsize=1)
def _libm_expf():
    import ctypes
    import ctypes.util
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
        return libm.expf
    except (OSError, AttributeError):
        return None


def _expf(values):
    """C expf on float32 values, from the C library the interpreter links (glibc's expf; ctypes). numpy's
    float32 exp is not the same function (about 1 ulp apart on a third of the table), so it is only
    the fallback when libm cannot be loaded."""
    values, expf = np.asarray(values, np.float32), _libm_expf()
    if expf is None:
        return np.exp(values)
    return np.array([expf(float(v)) for v in values.ravel()], np.float32).reshape(values.shape)


def softmax_table(input_scale, beta=1.0):
    """optimized_ops::PopulateSoftmaxLookupTable: table[255 - v] = expf(-input_scale*beta * v) in float32."""
    scale = -np.float32(input_scale) * np.float32(beta)
    return _expf(scale * np.arange(255, -1, -1, dtype=np.float32))


def softmax_lut(x, input_scale, input_zero_point, beta=1.0, output_zero_point=-128, output_scale=1.0 / 256):
    """Optimized-kernel int8 SOFTMAX over the last axis (the "builtin" runtime on x86; activations.cc
    kGenericOptimized without TFLITE_SOFTMAX_USE_UINT16_LUT, i.e. not aarch64+clang):
    optimized_ops::Softmax<int8, int8> with the float32 exp table of PopulateSoftmaxLookupTable.

    In float32: sum = sum_j table[255 - (max - x_j)] (in order), inv = 1 / (sum * output_scale),
    out = round(table[...] * inv) (half away from zero) + output_zero_point, clamped to int8."""
    del input_zero_point
    table = softmax_table(input_scale, beta)
    x = np.asarray(x, np.int64)
    e = table[255 - (x.max(axis=-1, keepdims=True) - x)]
    total = np.zeros(x.shape[:-1] + (1,), np.float32)
    for j in range(x.shape[-1]):  # sequential float32 accumulation, as the C loop
        total = (total + e[..., j:j + 1]).astype(np.float32)
    inv = (np.float32(1.0) / (total * np.float32(output_scale))).astype(np.float32)
    prob = (e * inv).astype(np.float32)
    out = _round_half_away(prob) + output_zero_point  # std::round(float)
    return np.clip(out, -128, 127).astype(np.int8)
