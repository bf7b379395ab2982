"""activations ops: reference and XNNPACK arithmetic side by side (see mobileqat.ops).

Read in LiteRT (ai-edge-litert 2.3: ``tflite/kernels/activations.cc``, ``kernels/internal/common.h``
(LUTPopulate), ``reference/hard_swish.h``, ``reference/reference_ops.h`` (ReluX),
``optimized/optimized_ops.h``, ``delegates/xnnpack/xnnpack_delegate.cc`` VisitUnaryNode) and XNNPACK
(``src/operators/unary-elementwise-nc.c``, ``src/reference/unary-elementwise.cc``,
``src/xnnpack/reference-utils.h``); every claim measured against the interpreter
(tests/test_ops_activations.py).

LOGISTIC, TANH (int8; output 1/256, -128 and 1/128, 0, fixed by TFLite): a 256-entry table.
  reference (BUILTIN_REF and the optimized builtin alike: LUTPopulate<int8_t>, float32):
      v = fl(si * (q - zi)); y = 1 / (1 + expf(-v)) | tanhf(v); out = clamp(roundf(fl(y * fl(1/so))) + zo)
  xnnpack (the delegate takes int8 LOGISTIC/TANH; XNNPACK has no qs8 kernel and fills its table with
  its reference unary kernel): v = fl(fl(q - zi) * si); sigmoid in double: e = exp(v), y = fl(e / (1 + e))
  (0 below -100, 1 above 100) | tanhf(v); out = clamp(nearbyint(fl(fl(y * fl(1/so)) + zo)))  (half to even).
RELU, RELU6 (int8, standalone: after a layer that cannot fuse them): not delegated (XNNPACK takes float
  RELU only), both runtimes run reference_ops::ReluX:
      m = QuantizeMultiplier(double(fl(si / so))); out = clamp(zo + MultiplyByQuantizedMultiplier(q - zi, m),
      zo + roundf(0 / so), zo + roundf(6 / so))   (the bounds in float32).
GELU (int8, exact and approximate): a 256-entry table, GeluPrepare's LUTPopulate<int8_t> of
  reference_ops::GeluTransform (float32: 0.5f * x * erfcf(x * (float)-M_SQRT1_2)) or GeluTransformApproximate;
  not delegated (XNNPACK 2.3 takes float GELU only): both runtimes run the builtin LookupTable.
HARD_SWISH (int8): not delegated (XNNPACK takes float HARD_SWISH only); both runtimes run
  reference_ops::HardSwish on x86 (optimized_ops::HardSwish has a NEON path only): 16-bit fixed point,
  x on a "hires" scale si/128, a "reluish" factor in [0, 1] from x on the scale 3/32768 (int16 multipliers
  from QuantizeMultiplier rounded to 16 bits), their product by a truncating doubling high mul, a rounding
  shift to the output scale.
ADD with a constant (hard_sigmoid's relu6(x + 3), fused RELU6): the elementwise ADD arithmetic of
  ``mobileqat.integer.add`` / ``integer_xnnpack.add`` with the constant broadcast.
swish (x * sigmoid(x)): the converter writes LOGISTIC (its fixed output range) and MUL(x, sigmoid), int8.
MUL (hard_sigmoid's * 1/6 with a constant; swish's x * sigmoid), delegated in both cases:
  reference_integer_ops::Mul: m = QuantizeMultiplier(fl(fl(s1 * s2) / so));
      out = clamp(zo + MultiplyByQuantizedMultiplier((q1 - z1) * (q2 - z2), m))
  xnnpack (qs8 vmul/vmulc, fp32 requantization): scale = fl(fl(s1 * s2) / so);
      out = clamp(cvtps(fl(float((q1 - z1) * (q2 - z2)) * scale)) + zo)   (ties to even)
  A following ReLU/ReLU6 is fused into the MUL (the ADD and the FULLY_CONNECTED too): a clamp as the
  runtime computes its bounds (``integer.activation_range`` / ``integer_xnnpack.activation_range``).
On aarch64 XNNPACK's MUL requantizes with "rndnu" and the builtin HARD_SWISH has a NEON path: neither is
reproduced or measured here (x86-64 only).
"""
import ctypes
import ctypes.util
import functools

import numpy as np

from mobileqat import integer, integer_xnnpack
from mobileqat.integer import multiply_by_quantized_multiplier, quantize_multiplier

F32 = np.float32


@functools.lru_cache(maxsize=None)
def _libm(name, argtype):
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        fn = getattr(libm, name)
        fn.restype, fn.argtypes = argtype, [argtype]
        return fn
    except (OSError, AttributeError):
        return None


def _c_call(name, values, dtype):
    """C library function ``name`` (expf, tanhf, exp) elementwise, as the interpreter links it."""
    argtype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    fn = _libm(name, argtype)
    values = np.asarray(values, dtype)
    if fn is None:  # no C library: numpy's function (can differ by 1 ulp, i.e. rarely by 1 LSB)
        return getattr(np, name.rstrip("f"))(values)
    return np.array([fn(float(v)) for v in values.ravel()], dtype).reshape(values.shape)


def _round_half_away(v):
    return integer._round_half_away(v)


_CODES = np.arange(-128, 128)


def _lookup(x, table):
    """table (256,) indexed by int8 code -128..127."""
    return table[np.asarray(x, np.int64) + 128].astype(np.int8)


# --- LOGISTIC / TANH ---------------------------------------------------------------------------------

def _tflite_sigmoid(v):
    return (F32(1.0) / (F32(1.0) + _c_call("expf", -v, np.float32))).astype(np.float32)


def _tflite_tanh(v):
    return _c_call("tanhf", v, np.float32)


def lut_tflite(fn, input_scale, input_zero_point, output_scale, output_zero_point):
    """LUTPopulate<int8_t> (common.h): the table both builtin kernels use, indexed by code + 128."""
    v = (F32(input_scale) * (_CODES - int(input_zero_point)).astype(np.float32)).astype(np.float32)
    inverse_scale = F32(F32(1.0) / F32(output_scale))
    rescaled = _round_half_away((fn(v) * inverse_scale).astype(np.float32))
    return np.clip(rescaled + int(output_zero_point), -128, 127).astype(np.int8)


def _xnn_sigmoid(v):
    """reference/unary-elementwise.cc SigmoidOp<float>: exp in double."""
    out = np.empty(v.shape, np.float32)
    e = _c_call("exp", v.astype(np.float64), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf / inf above ~709: replaced by 1 below
        out[:] = (e / (1.0 + e)).astype(np.float32)
    out[v > 100] = 1.0
    out[v < -100] = 0.0
    return out


def lut_xnnpack(fn, input_scale, input_zero_point, output_scale, output_zero_point):
    """XNNPACK's table for a qs8 unary op without a kernel of its own (init_lut_op_with_config running
    unary_ukernel_quantized of reference/unary-elementwise.cc on the 256 codes)."""
    v = ((_CODES.astype(np.float32) - F32(input_zero_point)) * F32(input_scale)).astype(np.float32)
    inv_y_scale = F32(F32(1.0) / F32(output_scale))
    y = ((fn(v) * inv_y_scale).astype(np.float32) + F32(output_zero_point)).astype(np.float32)
    return np.clip(np.rint(y), -128, 127).astype(np.int8)  # nearbyint, then saturate


def _table_kernel(lut, fn):
    def kernel(xs, ins, out, **params):
        (si, zi), (so, zo) = ins[0], out
        return _lookup(xs[0], lut(fn, si, zi, so, zo))
    return kernel


logistic_reference = _table_kernel(lut_tflite, _tflite_sigmoid)
logistic_xnnpack = _table_kernel(lut_xnnpack, _xnn_sigmoid)
tanh_reference = _table_kernel(lut_tflite, _tflite_tanh)
tanh_xnnpack = _table_kernel(lut_xnnpack, _tflite_tanh)  # std::tanh(float) in both


# --- GELU ---------------------------------------------------------------------------------------------

_SQRT1_2 = 0.70710678118654752440  # M_SQRT1_2
_SQRT_2_OVER_PI = F32(1.12837916709551257390 * _SQRT1_2)  # kSqrt2dPi = M_2_SQRTPI * M_SQRT1_2, as float


def _tflite_gelu(v):
    """reference_ops::GeluTransform (reference/gelu.h, float32): 0.5f * x * erfcf(x * (float)-M_SQRT1_2)."""
    v = np.asarray(v, np.float32)
    return ((F32(0.5) * v).astype(np.float32) * _c_call("erfcf", (v * F32(-_SQRT1_2)).astype(np.float32),
                                                         np.float32)).astype(np.float32)


def _tflite_gelu_approximate(v):
    """reference_ops::GeluTransformApproximate (float32, left to right):
    0.5f * x * (1.f + tanhf(kSqrt2dPi * (x + 0.044715f * x * x * x)))."""
    v = np.asarray(v, np.float32)
    cube = (((F32(0.044715) * v).astype(np.float32) * v).astype(np.float32) * v).astype(np.float32)
    t = _c_call("tanhf", (_SQRT_2_OVER_PI * (v + cube).astype(np.float32)).astype(np.float32), np.float32)
    return ((F32(0.5) * v).astype(np.float32) * (F32(1.0) + t).astype(np.float32)).astype(np.float32)


def gelu_table(input_scale, input_zero_point, output_scale, output_zero_point, approximate=False):
    """GeluPrepare's int8 table (LUTPopulate<int8_t> of GeluTransform[Approximate]), indexed by code + 128."""
    fn = _tflite_gelu_approximate if approximate else _tflite_gelu
    return lut_tflite(fn, input_scale, input_zero_point, output_scale, output_zero_point)


def gelu(xs, ins, out, approximate=False, **params):
    """GELU int8 (activations.cc GeluEval: LookupTable on the table of ``gelu_table``). Both runtimes: the
    XNNPACK delegate of ai-edge-litert 2.3 leaves int8 GELU to this builtin kernel (measured)."""
    (si, zi), (so, zo) = ins[0], out
    return _lookup(xs[0], gelu_table(si, zi, so, zo, approximate))


# --- RELU / RELU6 ------------------------------------------------------------------------------------

def relu_bounds(output_scale, output_zero_point, act_max=None):
    """QuantizedReluX's clamp: zo + roundf(act / so) in float32, within int8."""
    so, zo = F32(output_scale), int(output_zero_point)
    lo = max(-128, zo + int(_round_half_away(F32(0.0) / so)))
    hi = 127 if act_max is None else min(127, zo + int(_round_half_away(F32(act_max) / so)))
    return lo, hi


def _relu_x(act_max):
    def kernel(xs, ins, out, **params):
        """reference_ops::ReluX (both runtimes: XNNPACK does not take int8 RELU/RELU6)."""
        (si, zi), (so, zo) = ins[0], out
        m, shift = quantize_multiplier(float(F32(F32(si) / F32(so))))
        y = multiply_by_quantized_multiplier(np.asarray(xs[0], np.int64) - int(zi), m, shift) + int(zo)
        return np.clip(y, *relu_bounds(so, zo, act_max)).astype(np.int8)
    return kernel


relu = _relu_x(None)
relu6 = _relu_x(6.0)


# --- HARD_SWISH --------------------------------------------------------------------------------------

def _srdhm16(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul on int16 (ties away from zero, C division)."""
    a, b = np.asarray(a, np.int64), np.int64(b)
    ab = a * b
    total = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    high = np.where(total >= 0, total >> 15, -((-total) >> 15))
    return np.where((a == -32768) & (b == -32768), 32767, high)


def _sdhm16(a, b):
    """reference_ops::SaturatingDoublingHighMul: (a * b) / 2^15, truncating toward zero."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    high = np.where(ab >= 0, ab >> 15, -((-ab) >> 15))
    return np.where((a == -32768) & (b == -32768), 32767, high)


def _saturating_left_shift16(x, amount):
    return np.clip(np.asarray(x, np.int64) * (1 << amount), -32768, 32767)


def _rounding_divide_by_pot(x, exponent):
    return integer._rounding_divide_by_pot(x, exponent)


def _to_int16_multiplier(m32):
    """DownScaleInt32ToInt16Multiplier."""
    if m32 >= 2 ** 31 - 1 - (1 << 15):
        return 32767
    return (m32 + (1 << 15)) >> 16


def hard_swish_params(input_scale, output_scale):
    """HardSwishPrepare (float32 ratios, QuantizeMultiplier, 16-bit multipliers):
    (output multiplier int16, output exponent, reluish multiplier int16, reluish exponent)."""
    hires_input_scale = F32(F32(1.0 / 128.0) * F32(input_scale))
    reluish_scale = F32(3.0 / 32768.0)
    out_m, out_e = quantize_multiplier(float(F32(hires_input_scale / F32(output_scale))))
    rel_m, rel_e = quantize_multiplier(float(F32(hires_input_scale / reluish_scale)))
    if out_e > 0:
        raise ValueError(f"HARD_SWISH input scale {input_scale:.6g} / output scale {output_scale:.6g} is too large: "
                         "the interpreter refuses it (HardSwishPrepare needs output_multiplier_exponent <= 0)")
    return _to_int16_multiplier(out_m), out_e, _to_int16_multiplier(rel_m), rel_e


def hard_swish(xs, ins, out, **params):
    """reference_ops::HardSwish<int8_t> (both runtimes on x86)."""
    (si, zi), (so, zo) = ins[0], out
    out_m, out_e, rel_m, rel_e = hard_swish_params(si, so)
    value = np.asarray(xs[0], np.int64) - int(zi)
    hires = value * 128  # |value| <= 255: fits int16
    preshift_output = _srdhm16(hires, out_m)
    reluish = hires
    if rel_e > 0:
        reluish = _saturating_left_shift16(reluish, rel_e - 1)
    reluish = _srdhm16(reluish, rel_m)
    if rel_e > 0:
        reluish = _saturating_left_shift16(reluish, 1)
    if rel_e < 0:
        reluish = _rounding_divide_by_pot(reluish, -rel_e)
    reluish = (reluish + (1 << 15)) >> 1
    product = _sdhm16(reluish, preshift_output)
    y = _rounding_divide_by_pot(product, -out_e) + int(zo)
    return np.clip(y, -128, 127).astype(np.int8)


# --- ADD / MUL with a constant (hard_sigmoid = relu6(x + 3) * 1/6) -------------------------------------

def _const(params):
    """The constant operand: (int8 code, scale, zero point), as the file stores it."""
    return np.int64(params["const"]), F32(params["const_scale"]), int(params["const_zero_point"])


def add_const_reference(xs, ins, out, activation=None, **params):
    (si, zi), (so, zo) = ins[0], out
    c, sc, zc = _const(params)
    act = integer.activation_range(activation, so, zo)
    return integer.add(xs[0], si, zi, np.full_like(np.asarray(xs[0], np.int64), c), sc, zc, so, zo, act_range=act)


def add_const_xnnpack(xs, ins, out, activation=None, **params):
    (si, zi), (so, zo) = ins[0], out
    c, sc, zc = _const(params)
    act = integer_xnnpack.activation_range(activation, so, zo)
    return integer_xnnpack.add(xs[0], si, zi, np.full_like(np.asarray(xs[0], np.int64), c), sc, zc, so, zo,
                               act_range=act)


def mul_reference(x1, s1, z1, x2, s2, z2, so, zo, activation=None):
    """reference_integer_ops::Mul (mul.cc Prepare: the multiplier s1 * s2 / so in float32)."""
    m, shift = quantize_multiplier(float(F32(F32(F32(s1) * F32(s2)) / F32(so))))
    prod = (np.asarray(x1, np.int64) - int(z1)) * (np.asarray(x2, np.int64) - int(z2))
    act = integer.activation_range(activation, so, zo)
    return np.clip(multiply_by_quantized_multiplier(prod, m, shift) + int(zo), *act).astype(np.int8)


def mul_xnnpack(x1, s1, z1, x2, s2, z2, so, zo, activation=None):
    """XNNPACK qs8 vmul / vmulc, fp32 requantization (xnn_init_qs8_mul_minmax_scalar_params, the AVX
    mul16 kernels): fl(float((x1 - z1) * (x2 - z2)) * fl(fl(s1 * s2) / so)), cvtps (ties to even), + zo."""
    scale = F32(F32(F32(s1) * F32(s2)) / F32(so))
    if not F32(2.0 ** -16) <= scale < F32(256.0):
        raise ValueError(f"MUL product/output scale ratio {scale:.6g} is outside XNNPACK's [2^-16, 2^8): the delegate "
                         "leaves this MUL to the builtin kernel, which mobileqat does not reproduce")
    prod = ((np.asarray(x1, np.int64) - int(z1)) * (np.asarray(x2, np.int64) - int(z2))).astype(np.float32)
    y = np.rint((prod * scale).astype(np.float32)).astype(np.int64) + int(zo)
    act = integer_xnnpack.activation_range(activation, so, zo)
    return np.clip(np.clip(y, -128, 127), *act).astype(np.int8)


def _mul_const(mul):
    def kernel(xs, ins, out, activation=None, **params):
        (si, zi), (so, zo) = ins[0], out
        c, sc, zc = _const(params)
        return mul(xs[0], si, zi, c, sc, zc, so, zo, activation)
    return kernel


def _mul_two(mul):
    def kernel(xs, ins, out, activation=None, **params):
        (s1, z1), (s2, z2) = ins
        return mul(xs[0], s1, z1, xs[1], s2, z2, *out, activation)
    return kernel


mul_const_reference, mul_const_xnnpack = _mul_const(mul_reference), _mul_const(mul_xnnpack)
swish_mul_reference, swish_mul_xnnpack = _mul_two(mul_reference), _mul_two(mul_xnnpack)


def _same(fn):
    return {"reference": fn, "xnnpack": fn}


KERNELS = {
    "logistic": {"reference": logistic_reference, "xnnpack": logistic_xnnpack},
    "tanh": {"reference": tanh_reference, "xnnpack": tanh_xnnpack},
    "gelu": _same(gelu),
    "relu": _same(relu),
    "relu6": _same(relu6),
    "hard_swish": _same(hard_swish),
    "add_const": {"reference": add_const_reference, "xnnpack": add_const_xnnpack},
    "mul_const": {"reference": mul_const_reference, "xnnpack": mul_const_xnnpack},
    "swish_mul": {"reference": swish_mul_reference, "xnnpack": swish_mul_xnnpack},
}
