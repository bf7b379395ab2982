"""elementwise ops and joins: reference and XNNPACK arithmetic side by side (see mobileqat.ops).

Measured on ai-edge-litert 2.3 (x86-64 AVX2); sources read: LiteRT ``tflite/kernels/{add,sub,mul,
quantize,concatenation,maximum_minimum}.cc``, ``kernels/internal/reference/{sub,requantize}.h``,
``reference/integer_ops/mul.h``, ``optimized/integer_ops/mul.h``, ``optimized/optimized_ops.h``
(Requantize), ``delegates/xnnpack/xnnpack_delegate.cc`` (VisitBinaryNode, VisitUnaryNode,
VisitConcatenationNode); XNNPACK ``src/operators/binary-elementwise-nd.c``, ``src/microparams-init.c``
(qs8 add/mul/cvt params), ``src/configs/{binary,unary}-elementwise-config.c``,
``src/qs8-vmul/gen/qs8-vmul-minmax-fp32-avx-mul16-ld64-u16.c``, ``src/qs8-vcvt/gen/qs8-vcvt-avx2-u32.c``.
Inputs broadcast as numpy does ((N,1,1,C) against (N,H,W,C)); every formula below is per element.

ADD: reference = ``integer.add`` (inputs shifted left 20 bits, each brought to 2*max(s1, s2) by its
  own fixed-point multiplier, the sum to the output scale by a third); xnnpack = ``integer_xnnpack.add``
  (one integer multiply-add per input and a floor shift). The delegate refuses input/output scale
  ratios outside [1/1024, 256): that ADD runs on the builtin optimized kernel, ``integer_xnnpack.add_builtin``
  (NEON / NEON_2_SSE vector loop over whole 16-element blocks, reference arithmetic on the tail).
SUB: reference (sub.cc, reference_ops::Sub for int8 on every kernel type): ADD's arithmetic with the
  second scaled input subtracted. xnnpack: XNNPACK's ADD with the second input's scale negated
  (binary-elementwise-nd.c, sign_b = -1): b_multiplier < 0, bias = 2^(shift-1) - ma*z1 - mb*z2;
  ratios outside [1/1024, 256) run on the builtin kernel, i.e. the reference arithmetic.
MUL: reference (mul.cc Prepare: real = fl(fl(s1*s2)/so) in float32, QuantizeMultiplier):
  y = MultiplyByQuantizedMultiplier((x1-z1)*(x2-z2)) + zo, clamped. xnnpack (qs8 vmul "fp32", AVX):
  scale = fl(fl(s1*s2)/so); y = rint_half_even(fl(float((x1-z1)*(x2-z2)) * scale)) + zo, clamped;
  product/output scale ratios outside [2^-16, 256) run on the builtin optimized kernel, whose x86
  (non-NEON) loop is the reference formula. (aarch64 XNNPACK uses "rndnu" MUL params instead: not
  covered here.)
REQUANTIZE (QUANTIZE int8 -> int8, written by the converter before CONCATENATION/MAXIMUM/MINIMUM
  inputs whose scale differs, or after the first of a chain of pass-through layers feeding such a join:
  see ``lowering._join_scale_heads``): reference (quantize.cc, reference_ops::Requantize): multiplier of
  double(si)/double(so), y = MultiplyByQuantizedMultiplier(x - zi) + zo, clamped. xnnpack (qs8 convert):
  m = lrintf(256 * fl(si/so)), y = zo + floor(((x - zi) * m + 128) / 256), clamped; ratios outside
  [1/256, 128] run on the builtin kernel (optimized_ops::Requantize, the reference loop on x86).
CONCATENATION, MAXIMUM, MINIMUM: the converter gives inputs and output one scale and zero point
  (requantizing inputs first), so all runtimes copy / compare int8 codes: exact everywhere. XNNPACK
  delegates CONCATENATION (2 to 5 inputs; more run on the builtin copy); int8 MAXIMUM/MINIMUM are
  not delegated (float only) and run on the builtin kernel.
"""
import numpy as np

from mobileqat import integer, integer_xnnpack
from mobileqat.integer import multiply_by_quantized_multiplier, quantize_multiplier

F32 = np.float32


def _i64(x):
    return np.asarray(x, np.int64)


def _act(arith, activation, out):
    return arith.activation_range(activation, out[0], out[1]) if activation else (-128, 127)


# --- ADD (the arithmetic lives in mobileqat.integer / integer_xnnpack) --------------------------------

def add_reference(xs, ins, out, activation=None):
    (s1, z1), (s2, z2) = ins
    return integer.add(xs[0], s1, z1, xs[1], s2, z2, out[0], out[1], act_range=_act(integer, activation, out))


def add_xnnpack(xs, ins, out, activation=None):
    (s1, z1), (s2, z2) = ins
    if not integer_xnnpack.add_delegated(s1, s2, out[0]):
        return integer_xnnpack.add_builtin(xs[0], s1, z1, xs[1], s2, z2, out[0], out[1],
                                           act_range=_act(integer, activation, out))
    return integer_xnnpack.add(xs[0], s1, z1, xs[1], s2, z2, out[0], out[1],
                               act_range=_act(integer_xnnpack, activation, out))


# --- SUB ---------------------------------------------------------------------------------------------

def sub_reference(xs, ins, out, activation=None):
    """reference_ops::Sub (int8, left shift 20): ADD's rescaling, the scaled inputs subtracted."""
    (s1, z1), (s2, z2) = ins
    s1, s2, so = (np.float64(F32(s)) for s in (s1, s2, out[0]))
    twice_max = 2.0 * max(s1, s2)
    m1, sh1 = quantize_multiplier(s1 / twice_max)
    m2, sh2 = quantize_multiplier(s2 / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << 20) * so))
    a = multiply_by_quantized_multiplier((_i64(xs[0]) - z1) << 20, m1, sh1)
    b = multiply_by_quantized_multiplier((_i64(xs[1]) - z2) << 20, m2, sh2)
    y = multiply_by_quantized_multiplier(a - b, mo, sho) + out[1]
    return np.clip(y, *_act(integer, activation, out)).astype(np.int8)


def _in_ratio_range(scales, out_scale, lo, hi, hi_inclusive=False):
    ratios = [F32(F32(s) / F32(out_scale)) for s in scales]
    return all(lo <= r and (r <= hi if hi_inclusive else r < hi) for r in ratios)


def sub_xnnpack(xs, ins, out, activation=None):
    """XNNPACK SUB: the qs8 ADD microkernel with a negative second multiplier; the builtin kernel
    (reference arithmetic) where the delegate refuses the scales."""
    (s1, z1), (s2, z2) = ins
    if not _in_ratio_range((s1, s2), out[0], F32(1 / 1024), F32(256)):
        return sub_reference(xs, ins, out, activation)
    ma, mb, shift, _ = integer_xnnpack.add_params(s1, z1, s2, z2, out[0])
    mb = -mb
    bias = (1 << (shift - 1)) - ma * int(z1) - mb * int(z2)
    acc = bias + ma * _i64(xs[0]) + mb * _i64(xs[1])
    acc = acc.astype(np.int32).astype(np.int64) >> shift  # int32 wrap, arithmetic shift
    y = np.clip(acc + int(out[1]), -128, 127)
    return np.clip(y, *_act(integer_xnnpack, activation, out)).astype(np.int8)


# --- MUL ---------------------------------------------------------------------------------------------

def _mul_scale(s1, s2, so):
    return F32(F32(F32(s1) * F32(s2)) / F32(so))  # float32, as mul.cc Prepare and XNNPACK compute it


def mul_reference(xs, ins, out, activation=None):
    """reference_integer_ops::Mul / BroadcastMul6DSlow (and the x86 optimized kernel's scalar loop)."""
    (s1, z1), (s2, z2) = ins
    m, shift = quantize_multiplier(float(_mul_scale(s1, s2, out[0])))
    prod = (_i64(xs[0]) - z1) * (_i64(xs[1]) - z2)
    y = multiply_by_quantized_multiplier(prod, m, shift) + out[1]
    return np.clip(y, *_act(integer, activation, out)).astype(np.int8)


def mul_xnnpack(xs, ins, out, activation=None):
    """XNNPACK qs8 MUL (fp32 requantization); the builtin kernel where the delegate refuses the scales."""
    (s1, z1), (s2, z2) = ins
    scale = _mul_scale(s1, s2, out[0])
    if not F32(2.0 ** -16) <= scale < F32(256):
        return mul_reference(xs, ins, out, activation)
    prod = ((_i64(xs[0]) - z1) * (_i64(xs[1]) - z2)).astype(np.float32)  # |prod| <= 255^2: exact
    y = np.rint(prod * scale).astype(np.int64) + int(out[1])
    y = np.clip(y, -128, 127)
    return np.clip(y, *_act(integer_xnnpack, activation, out)).astype(np.int8)


# --- REQUANTIZE (QUANTIZE int8 -> int8) -----------------------------------------------------------------

def requantize_reference(xs, ins, out):
    """reference_ops::Requantize<int8, int8>: fixed-point multiplier of double(si) / double(so)."""
    (si, zi), = ins
    m, shift = quantize_multiplier(float(np.float64(F32(si)) / np.float64(F32(out[0]))))
    y = multiply_by_quantized_multiplier(_i64(xs[0]) - zi, m, shift) + out[1]
    return np.clip(y, -128, 127).astype(np.int8)


def requantize_xnnpack(xs, ins, out):
    """XNNPACK qs8 -> qs8 convert: a Q8 multiplier, round half up; the builtin kernel (the reference
    loop on x86) where the delegate refuses the ratio."""
    (si, zi), = ins
    ratio = F32(F32(si) / F32(out[0]))
    if not F32(1 / 256) <= ratio <= F32(128):
        return requantize_reference(xs, ins, out)
    m = int(np.rint(F32(256) * ratio))  # lrintf, ties to even
    y = int(out[1]) + (((_i64(xs[0]) - zi) * m + 128) >> 8)
    return np.clip(y, -128, 127).astype(np.int8)


# --- same-scale joins: CONCATENATION, MAXIMUM, MINIMUM ----------------------------------------------

def _same_quantization(kind, ins, out):
    for i, (s, z) in enumerate(ins):
        if F32(s) != F32(out[0]) or int(z) != int(out[1]):
            raise ValueError(f"{kind}: input {i} has scale/zero point {F32(s):.9g}/{z}, the output "
                             f"{F32(out[0]):.9g}/{out[1]}; the converter requantizes such inputs first "
                             "(lowering inserts the requantize op)")


def concatenation(xs, ins, out, axis=-1):
    """CONCATENATION of int8 tensors sharing one scale and zero point: a copy on every runtime."""
    _same_quantization("CONCATENATION", ins, out)
    return np.concatenate([np.asarray(x, np.int8) for x in xs], axis=axis)


def maximum(xs, ins, out):
    """MAXIMUM of int8 tensors sharing one scale and zero point: the larger code, every runtime."""
    _same_quantization("MAXIMUM", ins, out)
    return np.maximum(np.asarray(xs[0], np.int8), np.asarray(xs[1], np.int8))


def minimum(xs, ins, out):
    """MINIMUM of int8 tensors sharing one scale and zero point: the smaller code, every runtime."""
    _same_quantization("MINIMUM", ins, out)
    return np.minimum(np.asarray(xs[0], np.int8), np.asarray(xs[1], np.int8))


KERNELS = {
    "add": {"reference": add_reference, "xnnpack": add_xnnpack},
    "sub": {"reference": sub_reference, "xnnpack": sub_xnnpack},
    "mul": {"reference": mul_reference, "xnnpack": mul_xnnpack},
    "requantize": {"reference": requantize_reference, "xnnpack": requantize_xnnpack},
    "concatenation": {"reference": concatenation, "xnnpack": concatenation},
    "maximum": {"reference": maximum, "xnnpack": maximum},
    "minimum": {"reference": minimum, "xnnpack": minimum},
}
