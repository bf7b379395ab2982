"""TFLite's integer arithmetic in numpy, bit for bit with the reference kernels.

The pieces of lite/kernels/internal/common.{h,cc} (double-rounding build, the default):
  quantize_multiplier(m)                  real multiplier -> (int32 mantissa Q0.31, shift)
  multiply_by_quantized_multiplier(x,...) SaturatingRoundingDoublingHighMul + RoundingDivideByPOT
and whole ops built on them (conv2d, depthwise_conv2d) that take int8 tensors and the quantization
parameters read from a .tflite. Used to check single ops against the interpreter, and the basis of
an integer-exact evaluation path.

The convolutions run at BLAS speed with the integers of these definitions (float sums and a float64
fixed-point multiply only where provably exact, per-op constants computed once: see the comment above
``_BLOCK``), and int8 ADD is a lookup in a table of all input pairs made by the definition itself;
tests/test_integer_fast.py keeps the straightforward implementations and compares them on random inputs.
"""
import functools
import itertools
import math
import threading
import weakref

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


def _padding(h, w, kh, kw, stride, padding):
    """Output size and padding of a kh x kw window: (oh, ow, (top, bottom), (left, right))."""
    if padding == "SAME":
        oh, top = _same_padding(h, kh, stride[0])
        ow, left = _same_padding(w, kw, stride[1])
    else:
        oh, ow, top, left = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1, 0, 0
    bottom = max((oh - 1) * stride[0] + kh - h - top, 0)
    right = max((ow - 1) * stride[1] + kw - w - left, 0)
    return oh, ow, (top, bottom), (left, right)


def _patches(x, kh, kw, stride, padding, pad_value):
    """(N, H, W, C) -> (N, OH, OW, kh, kw, C) windows (a read-only strided view of the padded input, no
    copy); padding 'SAME' or 'VALID'."""
    n, h, w, c = x.shape
    oh, ow, pad_h, pad_w = _padding(h, w, kh, kw, stride, padding)
    if oh <= 0 or ow <= 0:
        return np.zeros((n, max(oh, 0), max(ow, 0), kh, kw, c), x.dtype)
    xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=pad_value)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))  # (N, ., ., C, kh, kw)
    return windows[:, :(oh - 1) * stride[0] + 1:stride[0], :(ow - 1) * stride[1] + 1:stride[1]].transpose(
        0, 1, 2, 4, 5, 3)


def _exact_dot(a, b):
    """Integer matrix product through float64 BLAS: exact while every partial sum stays below 2^53,
    i.e. for int8 x int8 products with fewer than 2^38 terms."""
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64)).astype(np.int64)


def _int_dot(a, b, b64=None, b_abs_sum=None):
    """a @ b of int64 matrices, exact: float64 BLAS when max|a| * max_j sum_k |b_kj| < 2^53 (every partial sum
    of any order is then an exact float64 integer), else numpy's int64 product. b64, b_abs_sum: b in float64
    and that column bound, when known."""
    if b_abs_sum is None:
        b_abs_sum = int(np.abs(b).sum(axis=0).max(initial=0)) if b.size else 0
    if a.size and b.size and int(np.abs(a).max()) * b_abs_sum >= 2 ** 53:
        return a @ b
    return np.matmul(np.asarray(a, np.float64), b if b64 is None else b64).astype(np.int64)


def _fc_weights(w):
    """FULLY_CONNECTED weights (out, in): int64, transposed float64 (in, out), row sums, max row sum of |w|."""
    def build():
        wi = np.asarray(w, np.int64)
        return dict(w=wi, wT=np.ascontiguousarray(wi.T, np.float64), wsum=wi.sum(axis=1),
                    abs_sum=int(np.abs(wi).sum(axis=1).max(initial=0)) if wi.size else 0)
    return _PLANS.get((w,), _key("fully_connected"), build)


# --- CONV_2D and DEPTHWISE_CONV_2D at BLAS speed, the same integers ---------------------------------
#
# Accumulators. acc = bias + sum((x - zp) * w) = sum(x * w) + (bias - zp * sum(w)), where padded
# positions hold zp (they contribute (zp - zp) * w = 0, as the kernels skip them). sum(x * w) is a BLAS
# matrix product (1x1: the input itself; else im2col with one strided copy per kernel row, no 6-D index
# arrays) or, for depthwise, one multiply and one add per tap over an output block, with the weights
# tiled along OW so that each is one long inner loop. In float32 it is exact when every partial sum is
# an integer below 2^24: |x| <= 128 (int8 codes and zero points) and sum_k |w_kc| <= 2^17 for every
# output channel c bound every partial sum of any summation order (BLAS blocking, FMA) by 2^24. int8
# weights always satisfy it up to 1032 terms (127 * 1032 < 2^17) and in depthwise; otherwise float64
# (exact below 2^53). The output is made in blocks of about _BLOCK values, so that temporaries stay in
# cache and memory stays bounded at any batch size.
#
# Requantization (reference kernels, MultiplyByQuantizedMultiplier with double rounding), per channel
# with M = mantissa, left = max(shift, 0), r = max(-shift, 0):
#     h = SaturatingRoundingDoublingHighMul(acc * 2^left, M) = floor((acc * M * 2^left + 2^30) / 2^31)
#         (the two C++ branches, nudge 2^30 or 1 - 2^30 and division truncating toward zero, are this
#         one floor; the saturating case needs M = INT32_MIN, impossible for M >= 0)
#     y = RoundingDivideByPOT(h, r) = floor((h + 2^(r-1) - [h < 0]) / 2^r)   (r >= 1; y = h for r = 0)
# With v = acc * M * 2^(left - 31 - r) (a real number) and floor(floor(a) / n) = floor(a / n):
#     y = floor(v + 1/2 + copysign(2^-(r+1), v))     (the copysign term 0 when r = 0)
# (for -2^-(r+1) <= v < 0 both signs give 0; with a clamp that keeps nothing below the zero point, as
# ReLU and ReLU6 do, the sign is not needed: every v < 0 clamps to act_min either way). In float64 every
# step is exact when r <= 20 and |acc * M * 2^left| <= 2^52: all terms are multiples of 2^-(31+r) with
# numerators below 2^53 (the output zero point joins before the floor only when that keeps them so). acc
# itself is the float32 sum of the exact sums and bias - zp * sum(w), exact while |acc| < 2^24. Each block
# checks its max |acc| and falls back to the int64 definition (multiply_by_quantized_multiplier) when the
# bound does not hold (MobileNetV2's accumulators times M stay below 2^48). Per-channel constants are
# tiled along the block's rows so that every elementwise step is one long inner loop. XNNPACK's fp32
# requantization is float32 already: fl32(acc) * scale_c, rounded to even.

_BLOCK = 1 << 17
_DW_BLOCK = 1 << 18
_EXACT_F32 = 1 << 24


class _Plans:
    """Per-op constants (weights laid out for BLAS, folded zero points, per-channel multipliers) computed
    once: keyed by the identity of the op's arrays and its scalars, re-checked by value on every call (an
    array changed in place gets a new plan). Arguments that are not ndarrays are not cached; entries whose
    arrays are gone are dropped."""

    def __init__(self, size=4096):
        self._plans, self._size = {}, size

    def get(self, arrays, values, build):
        if not all(a is None or isinstance(a, np.ndarray) for a in arrays):
            return build()
        key = tuple(id(a) for a in arrays) + tuple(values)
        hit = self._plans.get(key)
        if hit is not None:
            refs, copies, plan = hit
            if all((a is None and r is None) or (r is not None and r() is a and c.dtype == a.dtype
                                                 and np.array_equal(c, a)) for a, r, c in zip(arrays, refs, copies)):
                return plan
        plan = build()
        if len(self._plans) >= self._size:
            self._plans = {k: v for k, v in self._plans.items() if all(r is None or r() is not None for r in v[0])}
            while len(self._plans) >= self._size:
                self._plans.pop(next(iter(self._plans)))
        self._plans[key] = ([None if a is None else weakref.ref(a) for a in arrays],
                            [None if a is None else a.copy() for a in arrays], plan)
        return plan


_PLANS = _Plans()
_SERIAL = itertools.count()


def _key(*values):
    """Hashable, exact keys of scalars (float64 of the value given, so 0.1 and float32(0.1) differ)."""
    return tuple(float(v) if isinstance(v, (float, np.floating)) else
                 tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else v for v in values)


def conv_groups(x, w):
    """Groups of an int8 CONV_2D as TFLite reads them from its tensors: input channels / filter input channels
    (x (N, H, W, Cin), w (Cout, kh, kw, Cin / groups)); Cout and Cin must divide by it (conv.cc's checks)."""
    cin, cout, per_group = np.shape(x)[-1], np.shape(w)[0], np.shape(w)[-1]
    if per_group == 0 or cin % per_group or cout % (cin // per_group):
        raise ValueError(f"CONV_2D: the input has {cin} channels and the filter {tuple(np.shape(w))} (Cout, kh, kw, "
                         "Cin / groups); the input channels and Cout must be multiples of the groups they give.")
    return cin // per_group


def _weights_plan(w, depthwise, groups=1):
    """BLAS layout of int8 weights: conv (Cout, kh, kw, Cin / groups) -> "mat" (kh*kw*Cin, Cout), block-diagonal
    when grouped (output channel o reads input channels of its group only: the zeros elsewhere add nothing to
    any sum); depthwise (1, kh, kw, C) -> "taps" (kh, kw, C); float32 (float64 made when needed). Also sum(w)
    per output channel, max_c sum_k |w_kc| (the exactness bound) and a serial number (plans derived from
    this one key on it)."""
    def build():
        wi = np.asarray(w, np.int64)
        if groups != 1:
            cout, kh, kw, per_group = wi.shape
            full = np.zeros((cout, kh, kw, per_group * groups), np.int64)
            out_per_group = cout // groups
            for g in range(groups):
                full[g * out_per_group:(g + 1) * out_per_group, ..., g * per_group:(g + 1) * per_group] = \
                    wi[g * out_per_group:(g + 1) * out_per_group]
            wi = full
        if depthwise:
            taps = wi[0]
            return dict(depthwise=True, kh=taps.shape[0], kw=taps.shape[1], cin=taps.shape[2], cout=taps.shape[2],
                        taps=taps, wsum=taps.sum(axis=(0, 1)), serial=next(_SERIAL),
                        abs_sum=int(np.abs(taps).sum(axis=(0, 1)).max(initial=0)))
        cout, kh, kw, cin = wi.shape
        mat = wi.reshape(cout, -1).T
        return dict(depthwise=False, kh=kh, kw=kw, cin=cin, cout=cout, mat=mat, wsum=mat.sum(axis=0),
                    abs_sum=int(np.abs(mat).sum(axis=0).max(initial=0)), serial=next(_SERIAL))
    if depthwise and np.shape(w)[0] != 1:
        raise ValueError(f"depthwise weights (1, kh, kw, C) with depth multiplier 1, got shape {np.shape(w)}")
    return _PLANS.get((w,), _key("weights", depthwise, groups), build)


def _as(wp, name, dtype, tile=1):
    """wp[name] in dtype, C-contiguous, repeated ``tile`` times along its last axis; cached in wp."""
    key = (name, dtype, tile)
    if key not in wp:
        a = np.ascontiguousarray(wp[name], dtype)
        wp[key] = np.tile(a, (1,) * (a.ndim - 1) + (tile,)) if tile != 1 else a
    return wp[key]


def _blocks(n, oh, row_size, size):
    """(n0, n1, r0, r1) blocks of about ``size`` values of an (N, OH, ...) output of row_size values a row: whole
    images when one fits, else rows of one image (so every block is contiguous in the output)."""
    if oh * row_size >= size:
        rows = max(1, size // max(row_size, 1))
        for i in range(n):
            for r in range(0, oh, rows):
                yield i, i + 1, r, min(r + rows, oh)
    else:
        images = max(1, size // max(oh * row_size, 1))
        for i in range(0, n, images):
            yield i, min(i + images, n), 0, oh


def _conv_sums(x, zero_point, wp, stride, padding, finish, out_dtype):
    """Run sum(x * w) (padded with zero_point) block by block: finish(sums (P, C) float, out (P, C), k) writes
    each block of the (N, OH, OW, C) output of out_dtype; k divides P (rows can be taken k at a time, so that
    per-channel constants tiled k times make long inner loops). Returns the output."""
    x = np.asarray(x)
    if x.dtype != np.int8:
        x = np.asarray(x, np.int64)
    n, h, wd, cin = x.shape
    if cin != wp["cin"]:
        raise ValueError(f"input has {cin} channels, the weights {wp['cin']}")
    kh, kw, cout, s0, s1 = wp["kh"], wp["kw"], wp["cout"], int(stride[0]), int(stride[1])
    oh, ow, pad_h, pad_w = _padding(h, wd, kh, kw, (s0, s1), padding)
    out = np.empty((n, max(oh, 0), max(ow, 0), cout), out_dtype)
    if out.size == 0:
        return out
    x_max = 128 if x.dtype == np.int8 else int(np.abs(x).max(initial=0))
    exact32 = max(x_max, abs(int(zero_point))) * wp["abs_sum"] <= _EXACT_F32
    dtype = np.float32 if exact32 else np.float64
    if not wp["depthwise"] and kh == kw == s0 == s1 == 1 and oh == h and ow == wd:  # 1x1: one matrix product
        x2, o2, mat = x.reshape(-1, cin), out.reshape(-1, cout), _as(wp, "mat", dtype)
        k = max(1, 2048 // cout)
        rows = max(16, _BLOCK // cout) // k * k or k
        for p in range(0, len(x2), rows):
            block = x2[p:p + rows]
            a = _scratch("in", block.shape, dtype)
            np.copyto(a, block, casting="unsafe")
            finish(np.matmul(a, mat, out=_scratch("sums", (len(block), cout), dtype)), o2[p:p + rows],
                   math.gcd(len(block), k))
        return out
    if x.dtype == np.int8 and not -128 <= int(zero_point) <= 127:
        x = x.astype(np.int64)
    pad_value = np.asarray(zero_point).astype(x.dtype)
    xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=pad_value) if pad_h + pad_w != (0, 0, 0, 0) else x
    xp = np.ascontiguousarray(xp)
    for n0, n1, r0, r1 in _blocks(n, oh, ow * cout, _DW_BLOCK if wp["depthwise"] else _BLOCK):
        nb, rows = n1 - n0, r1 - r0
        if wp["depthwise"]:
            # the input rows in float, split by column phase when strided (columns p, p + s1, ...), so that each
            # tap reads OW x C contiguous values and meets the weights tiled along OW in one long inner loop
            rows_in = xp[n0:n1, r0 * s0:(r1 - 1) * s0 + kh]
            phases = []
            for p in range(min(s1, kw)):
                src = rows_in[:, :, p::s1]
                phases.append(_scratch(f"phase{p}", src.shape, dtype))
                np.copyto(phases[-1], src, casting="unsafe")
            tiled = _as(wp, "taps", dtype, tile=ow)  # (kh, kw, OW * C)
            acc = _scratch("sums", (nb, rows, ow * cout), dtype)
            tmp = _scratch("tmp", (nb, rows, ow * cout), dtype)
            for i in range(kh):
                for j in range(kw):
                    phase, offset = phases[j % s1], j // s1
                    tap = phase[:, i:i + (rows - 1) * s0 + 1:s0, offset:offset + ow].reshape(nb, rows, ow * cout)
                    if i == j == 0:
                        np.multiply(tap, tiled[i, j], out=acc)
                    else:
                        acc += np.multiply(tap, tiled[i, j], out=tmp)
            sums = acc.reshape(-1, cout)
        else:
            # im2col, one strided copy per kernel row: its kw taps are kw * Cin contiguous input values
            buf = _scratch("in", (nb, rows, ow, kh * kw * cin), dtype)
            st = xp.strides
            for i in range(kh):
                window = np.lib.stride_tricks.as_strided(
                    xp[n0:n1, r0 * s0 + i:], (nb, rows, ow, kw * cin), (st[0], st[1] * s0, st[2] * s1, st[3]),
                    writeable=False)
                buf[..., i * kw * cin:(i + 1) * kw * cin] = window
            sums = np.matmul(buf.reshape(-1, kh * kw * cin), _as(wp, "mat", dtype),
                             out=_scratch("sums", (nb * rows * ow, cout), dtype))
        finish(sums, out[n0:n1, r0:r1].reshape(-1, cout), ow if ow * cout <= 1 << 16 else 1)
    return out


def _folded_bias(wp, bias, zero_point):
    """bias - zp * sum(w) per output channel (int64): the accumulator is sum(x * w) plus this."""
    return np.broadcast_to(np.asarray(bias, np.int64), (wp["cout"],)) - int(zero_point) * wp["wsum"]


def _accumulators(x, input_zero_point, w, bias, stride, padding, depthwise):
    wp = _weights_plan(w, depthwise, 1 if depthwise else conv_groups(x, w))
    folded = _folded_bias(wp, bias, input_zero_point)

    def finish(sums, out, k):
        np.add(sums.astype(np.int64), folded, out=out)
    return _conv_sums(x, input_zero_point, wp, stride, padding, finish, np.int64)


def conv_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    """int32 accumulators of int8 CONV_2D: bias + sum((x - zp) * w), (N,OH,OW,Cout) int64. Padded positions
    hold the zero point, i.e. contribute (zp - zp) * w = 0, as the kernels skip them."""
    return _accumulators(x, input_zero_point, w, bias, stride, padding, depthwise=False)


def depthwise_accumulators(x, input_zero_point, w, bias, stride=(1, 1), padding="SAME"):
    """int32 accumulators of int8 DEPTHWISE_CONV_2D, depth multiplier 1, w (1,kh,kw,C): (N,OH,OW,C) int64."""
    return _accumulators(x, input_zero_point, w, bias, stride, padding, depthwise=True)


def _fixed_point_plan(input_scale, filter_scales, output_scale, channels, folded, output_zero_point, act_min, act_max):
    """Per-channel constants of the reference requantization (see the comment above _BLOCK)."""
    mults = [quantize_multiplier(float(np.float64(input_scale) * np.float64(fs) / np.float64(output_scale)))
             for fs in np.broadcast_to(filter_scales, (channels,))]
    m = np.array([a for a, _ in mults], np.int64).reshape(-1)
    shift = np.array([b for _, b in mults], np.int64).reshape(-1)
    folded = np.ascontiguousarray(np.broadcast_to(np.asarray(folded, np.int64), (channels,)))
    plan = dict(multiplier=m, shift=shift, folded=folded, zero_point=int(output_zero_point),
                lo=int(act_min), hi=int(act_max), fast=False)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    if channels == 0 or left.max() > 20 or right.max() > 20:
        return plan
    mf = (m << left).astype(np.float64)  # M * 2^left < 2^51, exact
    max_multiplier = max(float(mf.max()), 1.0)
    folded32 = folded.astype(np.float32)
    fold_zero_point = (abs(int(output_zero_point)) + 1) * 2.0 ** (31 + int(right.max())) <= 2.0 ** 50
    half_ulp = np.where(right >= 1, np.ldexp(1.0, -(right + 1).astype(np.int32)), 0.0)
    offset = 0.5 + (int(output_zero_point) if fold_zero_point else 0)
    # When the clamp keeps no value below the zero point (ReLU, ReLU6), y < 0 and y' = floor(v + 1/2 + 2^-(r+1))
    # both clamp to act_min for v < 0 (both are <= 0 there), so the sign of v is not needed.
    signed = int(act_min) < int(output_zero_point)
    plan.update(fast=True, scale=np.ldexp(mf, -(31 + right)),  # v = acc * scale, exact
                half_ulp=half_ulp, signed=signed, offset=offset if signed else half_ulp + offset,
                fold_zero_point=fold_zero_point,
                folded32=folded32, folded32_exact=bool(np.all(folded32.astype(np.int64) == folded)),
                limit32=min(2.0 ** 24 - 1, 2.0 ** 52 / max_multiplier), limit64=2.0 ** 52 / max_multiplier)
    return plan


_LOCAL = threading.local()


def _scratch(name, shape, dtype):
    """A reusable temporary (a view of a flat buffer kept per name and thread): no page faults per block."""
    size = math.prod(shape)
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = np.empty(max(size, _BLOCK), dtype)
        setattr(_LOCAL, name, buf)
    return buf[:size].reshape(shape)


def _widen(sums, out, plan, k):
    """(P, C) blocks as (P / k, k * C) views, and plan's per-channel vector getter tiled k times."""
    if k > 1 and len(sums) % k == 0 and sums.flags.c_contiguous and out.flags.c_contiguous:
        shape = (len(sums) // k, k * sums.shape[1])
        sums, out = sums.reshape(shape), out.reshape(shape)
    else:
        k = 1

    def vector(name):
        value = plan[name]
        if k == 1 or np.ndim(value) == 0:
            return value
        key = (name, k)
        if key not in plan:
            plan[key] = np.tile(value, k)
        return plan[key]
    return sums, out, vector


def _requantize_fixed_point(sums, plan, out, k=1):
    """Reference requantization of one block: sums (P, C) exact integers (float or int), the accumulator
    being sums + plan['folded']; writes int8 into out (P, C). k: see _conv_sums."""
    if sums.size == 0:
        return
    if plan["fast"]:
        wide, out_wide, vector = _widen(sums, out, plan, k)
        if wide.dtype == np.float32 and plan["folded32_exact"]:
            acc = np.add(wide, vector("folded32"), out=_scratch("acc32", wide.shape, np.float32))
            limit = plan["limit32"]  # below 2^24: float32 sums of float32 integers were exact
        else:
            acc = np.add(wide, vector("folded"), dtype=np.float64)
            limit = plan["limit64"]
        if max(float(acc.max()), -float(acc.min())) <= limit:  # |acc * M * 2^left| <= 2^52
            v = np.multiply(acc, vector("scale"), out=_scratch("v", wide.shape, np.float64))
            if plan["signed"]:
                v += np.copysign(vector("half_ulp"), v, out=_scratch("t", wide.shape, np.float64))
            v += vector("offset")
            np.floor(v, out=v)
            if not plan["fold_zero_point"]:
                v += plan["zero_point"]
            np.clip(v, plan["lo"], plan["hi"], out=v)
            np.copyto(out_wide, v, casting="unsafe")
            return
    acc = np.asarray(sums).astype(np.int64) + plan["folded"]  # the int64 definition
    y = multiply_by_quantized_multiplier(acc, plan["multiplier"], plan["shift"]) + plan["zero_point"]
    out[...] = np.clip(y, plan["lo"], plan["hi"])


def _requantize(acc, input_scale, filter_scales, output_scale, output_zero_point, act_min, act_max):
    acc = np.asarray(acc)
    channels = acc.shape[-1]
    plan = _fixed_point_plan(input_scale, filter_scales, output_scale, channels, 0, output_zero_point,
                             act_min, act_max)
    out = np.empty(acc.shape, np.int8)
    acc2, out2 = acc.reshape(-1, channels), out.reshape(-1, channels)
    rows = max(16, _BLOCK // max(channels, 1))
    for p in range(0, len(acc2), rows):
        _requantize_fixed_point(acc2[p:p + rows], plan, out2[p:p + rows])
    return out


def _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point, stride,
             padding, act_range, depthwise):
    wp = _weights_plan(w, depthwise, 1 if depthwise else conv_groups(x, w))

    def build():
        return _fixed_point_plan(input_scale, filter_scales, output_scale, wp["cout"],
                                 _folded_bias(wp, bias, input_zero_point), output_zero_point, *act_range)
    plan = _PLANS.get((bias, filter_scales), _key("fixed_point", wp["serial"], input_scale, input_zero_point,
                                                  output_scale, output_zero_point, tuple(act_range)), build)
    return _conv_sums(x, input_zero_point, wp, stride, padding,
                      lambda s, o, k: _requantize_fixed_point(s, plan, o, k), np.int8)


def conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
           stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 CONV_2D (per-channel). x (N,H,W,Cin) int8; w (Cout,kh,kw,Cin/groups) int8 as TFLite
    stores it (groups = Cin / its last dimension, ``conv_groups``); bias (Cout,) int32 at scale
    input_scale*filter_scale. Returns (N,OH,OW,Cout) int8.
    The accumulators of ``conv_accumulators``, requantized as ``_requantize`` (both above: exact BLAS
    sums, the fixed-point multiply in float64 where provably exact, else int64)."""
    return _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
                    stride, padding, act_range, depthwise=False)


def depthwise_conv2d(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale,
                     output_zero_point, stride=(1, 1), padding="SAME", act_range=(-128, 127)):
    """Reference int8 DEPTHWISE_CONV_2D, depth multiplier 1. w (1,kh,kw,C) int8 as TFLite stores it."""
    return _conv_op(x, input_scale, input_zero_point, w, filter_scales, bias, output_scale, output_zero_point,
                    stride, padding, act_range, depthwise=True)


# --- elementwise ops of two int8 tensors: one 256 x 256 table per op -------------------------------

_CODES = np.arange(256, dtype=np.uint8).view(np.int8)  # the int8 value of each byte


def _binary_table(fn, params):
    """fn(x1, x2) on every pair of int8 codes: table[(byte(x1) << 8) | byte(x2)] (65,536 int8)."""
    return np.asarray(fn(np.repeat(_CODES, 256), np.tile(_CODES, 256), *params), np.int8)


_TABLES = {}


def _binary_by_table(fn, x1, x2, params):
    """fn(x1, x2, *params) for int8 arrays of one shape by table lookup (the table built once per params
    from fn itself, so the results are fn's); other inputs go to fn directly."""
    if not (isinstance(x1, np.ndarray) and isinstance(x2, np.ndarray) and x1.dtype == x2.dtype == np.int8
            and x1.shape == x2.shape and x1.size >= 4096):
        return fn(x1, x2, *params)
    key = (fn,) + _key(*params)
    table = _TABLES.get(key)
    if table is None:
        table = _binary_table(fn, params)
        if len(_TABLES) >= 1024:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    index = np.left_shift(x1.view(np.uint8), 8, dtype=np.uint16)
    index |= x2.view(np.uint8)
    return table[index]


def _add(x1, x2, scale1, zero_point1, scale2, zero_point2, output_scale, output_zero_point, act_range, left_shift):
    twice_max = 2.0 * max(np.float64(np.float32(scale1)), np.float64(np.float32(scale2)))
    m1, s1 = quantize_multiplier(np.float64(np.float32(scale1)) / twice_max)
    m2, s2 = quantize_multiplier(np.float64(np.float32(scale2)) / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * np.float64(np.float32(output_scale))))
    a = multiply_by_quantized_multiplier((np.asarray(x1, np.int64) - zero_point1) << left_shift, m1, s1)
    b = multiply_by_quantized_multiplier((np.asarray(x2, np.int64) - zero_point2) << left_shift, m2, s2)
    out = multiply_by_quantized_multiplier(a + b, mo, so) + output_zero_point
    return np.clip(out, *act_range).astype(np.int8)


def add(x1, scale1, zero_point1, x2, scale2, zero_point2, output_scale, output_zero_point,
        act_range=(-128, 127), left_shift=20):
    """Reference int8 ADD with general rescaling (inputs of different scales), same shapes.

    Each input is shifted left by 20 bits and brought to the scale 2*max(s1, s2) with its own
    fixed-point multiplier; the sum is brought to the output scale with a third (add.cc Prepare).
    int8 inputs are looked up in a table of all 65,536 input pairs computed this way."""
    return _binary_by_table(_add, x1, x2, (scale1, zero_point1, scale2, zero_point2, output_scale, output_zero_point,
                                           tuple(act_range), left_shift))


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
    fc, x = _fc_weights(w), np.asarray(x, np.int64)
    acc = _int_dot(x, fc["w"].T, fc["wT"], fc["abs_sum"]) - input_zero_point * fc["wsum"]
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


def softmax_uint16_table(input_scale, beta=1.0):
    """PopulateSoftmaxUInt8LookupTable (optimized kernel with TFLITE_SOFTMAX_USE_UINT16_LUT, the aarch64 clang
    builds): table[v] = min(65535, int(expf(input_scale*beta * (v - 255)) * 65535 + 0.5)), v = 0..255, the
    product in float32 and the + 0.5 in double, as the C++ expression promotes them."""
    scale = np.float32(input_scale) * np.float32(beta)
    e = _expf((scale * (np.arange(256, dtype=np.float32) - np.float32(255))).astype(np.float32))
    product = (e * np.float32(65535)).astype(np.float32)
    return np.minimum(65535, np.floor(product.astype(np.float64) + 0.5)).astype(np.int64)


def softmax_lut_uint16(x, input_scale, input_zero_point, beta=1.0, output_zero_point=-128, output_scale=1.0 / 256):
    """Optimized-kernel int8 SOFTMAX of the aarch64 builds (SoftmaxInt8LUT, TFLITE_SOFTMAX_USE_UINT16_LUT): what
    a phone's XNNPACK runtime runs for int8 SOFTMAX (the delegate does not take it), over the last axis.

    e_j = table[255 - (max - x_j)] (uint16, ``softmax_uint16_table``); sum = sum_j e_j (exact integer);
    inv = 1 / (sum * output_scale) in float32; (multiplier, shift) = QuantizeMultiplier(inv);
    out = MultiplyByQuantizedMultiplier(e_j, multiplier, shift) + output_zero_point, clamped to int8.
    Measured equal to the aarch64 ai-edge-litert 2.3 wheel under QEMU (``make arm64-check``)."""
    del input_zero_point
    table = softmax_uint16_table(input_scale, beta)
    x = np.asarray(x, np.int64)
    e = table[255 - (x.max(axis=-1, keepdims=True) - x)]
    total = e.sum(axis=-1)
    flat_e, flat_total = e.reshape(-1, e.shape[-1]), total.reshape(-1)
    out = np.empty(flat_e.shape, np.int64)
    for i in range(len(flat_e)):
        inv = np.float32(1.0) / (np.float32(flat_total[i]) * np.float32(output_scale))
        multiplier, shift = quantize_multiplier(float(inv))
        out[i] = multiply_by_quantized_multiplier(flat_e[i], multiplier, shift)
    return np.clip(out.reshape(e.shape) + output_zero_point, -128, 127).astype(np.int8)
