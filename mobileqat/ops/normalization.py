"""normalization ops (LayerNormalization as ``layers.LayerNormCore`` writes it): reference and XNNPACK
arithmetic side by side (see mobileqat.ops).

The converter writes ``LayerNormCore`` as MEAN(x, -1) -> SUB -> MUL(d, d) -> MEAN(-1) -> RSQRT -> MUL(d, r),
all int8 (measured, TF 2.21); SUB and MUL are the ``mobileqat.ops.elementwise`` kernels (broadcast over
the channel axis). Read in LiteRT (``tflite/kernels/reduce.cc`` EvalMean, ``reference/reduce.h``
QuantizedMeanOrSum, ``tflite/kernels/elementwise.cc`` RsqrtEvalQuantizedInt8, ``kernels/internal/common.h``
GetInvSqrtQuantizedMultiplierExp, ``delegates/xnnpack/xnnpack_delegate.cc`` VisitReduceNode / VisitUnaryNode);
every claim measured against the interpreter (tests/test_ops_normalization.py).

MEAN over the last axis (keepdims), (N, ..., C) -> (N, ..., 1):
  reference: EvalMean takes its 4D fast path only for axes (1, 2), so both builtin kernel types run
  reference_ops::QuantizedMeanOrSum: the int32 sum minus count * zi, times the multiplier of
  double(si) / double(so) with 1 / count folded in, + zo (``integer.mean_hw``'s arithmetic over C).
  xnnpack: the delegate takes int8 MEAN over any axes (static reduce): float32 m = fl(fl(si / so) * fl(1 / count)),
  y = nearbyint(fl(fl(sum) * m) + b), b = fl(zo - fl(count * zi) * m) (``integer_xnnpack.mean_hw``'s
  arithmetic over C).
RSQRT (int8): not delegated (XNNPACK takes float RSQRT only; measured): every runtime runs the builtin
  kernel, a per-code integer function: v = q - zi (q < zi is an error: input ranges start at 0 here);
  v == 0 -> 127; else (m, s) = GetInvSqrtQuantizedMultiplierExp(v) (Newton-Raphson in gemmlowp fixed point),
  data = MultiplyByQuantizedMultiplier(1, m, s + 20), y = MultiplyByQuantizedMultiplier(data, M, S - 20) + zo,
  clamped, with (M, S) = QuantizeMultiplier(1.0 / fl(sqrtf(si) * so)) (the product in float32).
"""
import functools

import numpy as np

from mobileqat import integer, integer_xnnpack
from mobileqat.integer import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, quantize_multiplier

F32 = np.float32


# --- MEAN over the last axis --------------------------------------------------------------------------

def _mean_last(arith):
    def mean_last(xs, ins, out):
        x = np.asarray(xs[0], np.int8)
        lead, c = x.shape[:-1], x.shape[-1]
        y = arith.mean_hw(x.reshape(-1, 1, c, 1), ins[0][0], ins[0][1], out[0], out[1])  # sum over "H, W" = C
        return y.reshape(lead + (1,))
    mean_last.__doc__ = (f"int8 MEAN over the last axis, keepdims, with {arith.__name__}.mean_hw's arithmetic: "
                         "(N, ..., C) -> (N, ..., 1).")
    return mean_last


# --- RSQRT ----------------------------------------------------------------------------------------------

def _wrap32(v):
    return ((np.int64(v) + 2 ** 31) & 0xFFFFFFFF) - 2 ** 31


def _srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 scalars."""
    return int(integer._saturating_rounding_doubling_high_mul(np.int64(a), np.int64(b)))


def _rdbp(x, exponent):
    return int(integer._rounding_divide_by_pot(np.int64(x), np.int64(exponent)))


def _sat_mul_pot(x, exponent):
    """gemmlowp SaturatingRoundingMultiplyByPOT<exponent> on an int32 scalar."""
    if exponent <= 0:
        return _rdbp(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    if x > threshold:
        return INT32_MAX
    if x < -threshold:
        return INT32_MIN
    return int(_wrap32(x << exponent))


def _clz32(v):
    return 32 - int(v).bit_length()


def inv_sqrt_multiplier(value):
    """GetInvSqrtQuantizedMultiplierExp(value, kReverseShift = -1): (int32 multiplier, left shift) with
    1 / sqrt(value) ~= multiplier * 2^(shift - 31), value >= 0 an int32."""
    if value <= 1:
        return INT32_MAX, 0
    shift = 11
    while value >= (1 << 29):
        value //= 4
        shift += 1
    pairs = (_clz32(value) - 1) // 2 - 1
    shift -= pairs
    value <<= 2 * pairs
    # F3 = FixedPoint<int32, 3>: raw / 2^28. Products of two F3 are F6; Rescale<3> = SaturatingRoundingMultiplyByPOT<3>.
    fp_input = value >> 1
    half_input = _sat_mul_pot(fp_input, -1)
    half_three = (1 << 28) + (1 << 27)
    x = 1 << 28  # F3::One()
    for _ in range(5):
        x3 = _sat_mul_pot(_srdhm(_srdhm(x, x), x), 6)  # x * x is F6, times x F9; Rescale<3>: POT<6>
        x = _sat_mul_pot(int(_wrap32(_srdhm(half_three, x) - _srdhm(half_input, x3))), 3)
    x = _srdhm(x, 1518500250)  # F3 * F0 -> F3
    if shift < 0:
        x = int(_wrap32(x << -shift))
        shift = 0
    return x, -shift


@functools.lru_cache(maxsize=4096)
def rsqrt_table(input_scale, input_zero_point, output_scale, output_zero_point):
    """The int8 RSQRT output of each input code -128..127 (int16; -999 marks codes below the zero point,
    which the kernel refuses), as RsqrtEvalQuantizedInt8 computes it."""
    prod = F32(np.sqrt(F32(input_scale), dtype=F32) * F32(output_scale))  # std::sqrt(float), float product
    mult, shift = quantize_multiplier(1.0 / float(prod))
    table = np.zeros(256, np.int16)
    for i, q in enumerate(range(-128, 128)):
        v = q - int(input_zero_point)
        if v < 0:
            table[i] = -999
            continue
        if v == 0:
            table[i] = 127
            continue
        m, s = inv_sqrt_multiplier(v)
        data = int(multiply_by_quantized_multiplier(np.int64(1), m, s + 20))
        y = int(multiply_by_quantized_multiplier(np.int64(data), mult, shift - 20)) + int(output_zero_point)
        table[i] = min(max(y, -128), 127)
    return table


def rsqrt(xs, ins, out):
    """int8 RSQRT (the builtin kernel on every runtime): a lookup in ``rsqrt_table``."""
    (si, zi), = ins
    table = rsqrt_table(F32(si), int(zi), F32(out[0]), int(out[1]))
    x = np.asarray(xs[0], np.int8)
    y = table[x.astype(np.int64) + 128]
    if np.any(y < -128):
        raise ValueError(f"RSQRT: input codes below the zero point {zi} (negative values); the int8 kernel "
                         "refuses them ('Rsqrt is only defined for positive values')")
    return y.astype(np.int8)


KERNELS = {
    "mean_last": {"reference": _mean_last(integer), "xnnpack": _mean_last(integer_xnnpack)},
    "rsqrt": {"reference": rsqrt, "xnnpack": rsqrt},
}
