"""resize ops: reference and XNNPACK arithmetic side by side (see mobileqat.ops).

What the converter writes (tf_keras 2 QAT models, int8 I/O) and what each runtime computes, read in LiteRT
``tflite/kernels/{resize_nearest_neighbor,resize_bilinear,transpose_conv}.cc``,
``kernels/internal/reference/{resize_nearest_neighbor,resize_bilinear}.h``,
``kernels/internal/reference/integer_ops/transpose_conv.h``, ``kernels/internal/optimized/optimized_ops.h``
(ResizeNearestNeighbor, Quantize), ``kernels/internal/optimized/integer_ops/transpose_conv.h``,
``delegates/xnnpack/xnnpack_delegate.cc``; XNNPACK ``src/indirection.c``
(xnn_indirection_init_resize_bilinear2d_hwc_q11), ``src/s8-ibilinear/{scalar,sse}.c.in``,
``src/configs/ibilinear-config.c``:

RESIZE_NEAREST_NEIGHBOR (UpSampling2D / Resizing, "nearest"; half_pixel_centers=True, align_corners=False;
  the output keeps the input's scale and zero point): a gather. Source index
  min(floor(fl((o + 0.5) * fl(in / out))), in - 1), float32. The delegate does not take it; the builtin
  optimized kernel calls the reference one when half_pixel_centers is set: one function for both runtimes.
RESIZE_BILINEAR (UpSampling2D / Resizing, "bilinear"; half_pixel_centers=True; same scale in and out):
  reference (ResizeBilinearInteger): Q10 positions, scale_10 = (1024 * in + out / 2) / out,
    p = o * scale_10 + scale_10 / 2 - 512, corners p / 1024 (C division) and (p + 1023) / 1024, the four
    products with Q10 weights summed in int64 (Q20), rounded half away from zero (double-rounding build).
  xnnpack (delegated, s8 ibilinear): float32 positions o * fl(in / out) + fl(0.5 * scale - 0.5) clamped
    to [0, in - 1], weights lrintf(frac * 2048) (Q11), t = (tl << 11) + (tr - tl) * ah,
    b likewise, y = ((t << 11) + (b - t) * av + 2^21) >> 22 (ties up). Differs at negative ties, and
    where the Q10 scale of the reference is not exact (size 3: 341/1024 against 1/3).
TRANSPOSE_CONV (Conv2DTranspose, per-tensor int8 weights in OHWI, int32 bias at input_scale * filter_scale,
  fused RELU/RELU6; Keras' dynamic batch makes the converter compute the output shape with int32
  SHAPE -> STRIDED_SLICE -> PACK): scatter-add of (x - zp) * w into int32 accumulators, + bias,
  requantized per channel with the fixed-point multiplier of double(si) * double(sw) / double(so)
  (MultiplyByQuantizedMultiplier), + zp, clamp. The delegate would take int8 TRANSPOSE_CONV (XNNPACK qs8_qc8w
  deconvolution, fp32 requantization: ``transpose_conv_xnnpack``, measured on a file rewritten with a constant
  shape) only with a constant output-shape tensor (CheckTensorStaticAllocation), which these files do not
  have, so LiteRT's default path runs the builtin optimized kernel (ruy GEMM + col2im, then
  optimized_ops::Quantize): on x86 that is MultiplyByQuantizedMultiplier too, the reference arithmetic.
  (On aarch64 its NEON Quantize uses vqdmulh without rounding before the rounding shift; not reproduced here.)
"""
import numpy as np

from mobileqat import integer_xnnpack
from mobileqat.integer import _exact_dot, _requantize, activation_range

F32 = np.float32


def _same_quantization(ins, out, kind):
    if (F32(ins[0][0]), int(ins[0][1])) != (F32(out[0]), int(out[1])):
        raise ValueError(f"{kind}: int8 resize keeps its input's scale and zero point, got input "
                         f"{ins[0]} and output {out}")


# --- RESIZE_NEAREST_NEIGHBOR -----------------------------------------------------------------------

def _nearest_index(out_size, in_size, align_corners, half_pixel_centers):
    """reference_ops::GetNearestNeighbor for every output index, in float32."""
    if align_corners and out_size > 1:
        scale = F32(in_size - 1) / F32(out_size - 1)
    else:
        scale = F32(in_size) / F32(out_size)
    v = (np.arange(out_size, dtype=F32) + F32(0.5 if half_pixel_centers else 0.0)) * scale
    if align_corners:
        idx = np.trunc(v + np.copysign(F32(0.5), v))  # TfLiteRound: half away from zero
    else:
        idx = np.floor(v)
    idx = np.minimum(idx.astype(np.int64), in_size - 1)
    return np.maximum(idx, 0) if half_pixel_centers else idx


def resize_nearest(xs, ins, out, size, align_corners=False, half_pixel_centers=True):
    """int8 RESIZE_NEAREST_NEIGHBOR (N, H, W, C) -> (N, size[0], size[1], C), both runtimes."""
    _same_quantization(ins, out, "resize_nearest")
    x = np.asarray(xs[0], np.int8)
    iy = _nearest_index(size[0], x.shape[1], align_corners, half_pixel_centers)
    ix = _nearest_index(size[1], x.shape[2], align_corners, half_pixel_centers)
    return x[:, iy][:, :, ix]


# --- RESIZE_BILINEAR ---------------------------------------------------------------------------------

def _c_div(a, b):
    """C integer division (truncates toward zero), b > 0."""
    a = np.asarray(a, np.int64)
    return np.sign(a) * (np.abs(a) // b)


def _bilinear_q10(out_size, in_size, align_corners, half_pixel_centers):
    """ComputeInterpolationValuesInteger: Q10 positions and the two source indices per output index."""
    if align_corners and out_size > 1:
        scale_10 = ((1 << 10) * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
    else:
        scale_10 = ((1 << 10) * in_size + out_size // 2) // out_size
    p = np.arange(out_size, dtype=np.int64) * scale_10
    if half_pixel_centers:
        p = p + scale_10 // 2 - (1 << 9)
    lo = np.maximum(_c_div(p, 1 << 10), 0)
    hi = np.minimum(_c_div(p + (1 << 10) - 1, 1 << 10), in_size - 1)
    return p - (1 << 10) * lo, lo, hi  # fraction (may be negative at the border), lower, upper


def resize_bilinear_reference(xs, ins, out, size, align_corners=False, half_pixel_centers=True):
    """Reference int8 RESIZE_BILINEAR (reference_ops::ResizeBilinearInteger), double-rounding build."""
    _same_quantization(ins, out, "resize_bilinear")
    x = np.asarray(xs[0], np.int64)
    fy, y0, y1 = _bilinear_q10(size[0], x.shape[1], align_corners, half_pixel_centers)
    fx, x0, x1 = _bilinear_q10(size[1], x.shape[2], align_corners, half_pixel_centers)
    fy, fx = fy[None, :, None, None], fx[None, None, :, None]
    one = 1 << 10

    def at(iy, ix):
        return x[:, iy][:, :, ix]
    q20 = (at(y0, x0) * (one - fy) * (one - fx) + at(y1, x0) * fy * (one - fx)
           + at(y0, x1) * (one - fy) * fx + at(y1, x1) * fy * fx)
    rounded = _c_div(q20 + np.where(q20 > 0, 1 << 19, -(1 << 19)), 1 << 20)
    return rounded.astype(np.int8)


def _bilinear_q11(out_size, in_size, align_corners, half_pixel_centers):
    """xnn_indirection_init_resize_bilinear2d_hwc_q11 along one axis: (top, bottom, Q11 weight)."""
    adjust = int(align_corners and out_size != 1)
    scale = F32(F32(in_size - adjust) / F32(out_size - adjust))
    o = np.arange(out_size, dtype=np.int64).astype(F32)
    if align_corners or not half_pixel_centers:  # align corners / TensorFlow legacy mode
        v = np.minimum((o * scale).astype(F32), F32(in_size - 1))
    else:
        offset = F32(F32(0.5) * scale - F32(0.5))
        v = ((o * scale).astype(F32) + offset).astype(F32)  # two float32 roundings (no FMA)
        v = np.minimum(np.maximum(v, F32(0.0)), F32(in_size - 1))
    top = v.astype(np.int64)
    bottom = np.minimum(top + 1, in_size - 1)
    alpha = (v - top.astype(F32)).astype(F32)
    weight = np.rint((alpha * F32(2048.0)).astype(F32)).astype(np.int64)  # lrintf: ties to even
    return top, bottom, weight


def resize_bilinear_xnnpack(xs, ins, out, size, align_corners=False, half_pixel_centers=True):
    """XNNPACK int8 RESIZE_BILINEAR (s8 ibilinear microkernels: scalar, SSE2/4.1 and NEON agree)."""
    _same_quantization(ins, out, "resize_bilinear")
    x = np.asarray(xs[0], np.int64)
    y0, y1, av = _bilinear_q11(size[0], x.shape[1], align_corners, half_pixel_centers)
    x0, x1, ah = _bilinear_q11(size[1], x.shape[2], align_corners, half_pixel_centers)
    av, ah = av[None, :, None, None], ah[None, None, :, None]

    def at(iy, ix):
        return x[:, iy][:, :, ix]
    tl, tr, bl, br = at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)
    t = (tl << 11) + (tr - tl) * ah
    b = (bl << 11) + (br - bl) * ah
    acc = (t << 11) + (b - t) * av  # |acc| < 2^30: no int32 wrap
    return ((acc + (1 << 21)) >> 22).astype(np.int8)


# --- TRANSPOSE_CONV ----------------------------------------------------------------------------------

def _transpose_conv_padding(out_size, k, stride, padding):
    """TFLite's padding of TRANSPOSE_CONV (ComputePaddingHeightWidth on the output size)."""
    n = (out_size + stride - 1) // stride if padding == "SAME" else (out_size + stride - k) // stride
    return max((n - 1) * stride + k - out_size, 0) // 2


def transpose_conv_accumulators(x, input_zero_point, w, bias, stride, padding, output_size):
    """int32 accumulators of int8 TRANSPOSE_CONV: each input pixel's (x - zp) * w[:, fy, fx, :] added at
    output (iy * stride - pad + fy, ix * stride - pad + fx), + bias. x (N, H, W, Cin), w (Cout, kh, kw, Cin)."""
    x = np.asarray(x, np.int64) - input_zero_point
    n, h, wd, _ = x.shape
    cout, kh, kw, _ = w.shape
    (sh, sw), (oh, ow) = stride, output_size
    top, left = (_transpose_conv_padding(oh, kh, sh, padding), _transpose_conv_padding(ow, kw, sw, padding))
    buf = np.zeros((n, max((h - 1) * sh + kh, top + oh), max((wd - 1) * sw + kw, left + ow), cout), np.int64)
    for fy in range(kh):
        for fx in range(kw):
            tap = _exact_dot(x, np.asarray(w[:, fy, fx, :]).T)  # (N, H, W, Cout)
            buf[:, fy:fy + (h - 1) * sh + 1:sh, fx:fx + (wd - 1) * sw + 1:sw] += tap
    acc = buf[:, top:top + oh, left:left + ow]
    return acc + (np.asarray(bias, np.int64) if bias is not None else 0)


def transpose_conv(xs, ins, out, weights, filter_scales, bias, stride, padding, output_size, activation=None):
    """int8 TRANSPOSE_CONV on the reference kernels (reference_integer_ops::TransposeConv) and on the
    builtin optimized kernel x86 runs for LiteRT's default path (same accumulators, same fixed-point
    requantization). weights (Cout, kh, kw, Cin) int8 as TFLite stores them."""
    (si, zi), (so, zo) = ins[0], out
    acc = transpose_conv_accumulators(xs[0], zi, weights, bias, stride, padding, output_size)
    return _requantize(acc, si, filter_scales, so, zo, *activation_range(activation, so, zo))


def transpose_conv_xnnpack(xs, ins, out, weights, filter_scales, bias, stride, padding, output_size,
                           activation=None):
    """XNNPACK int8 TRANSPOSE_CONV (qs8_qc8w deconvolution): what the delegate computes when it takes the op,
    i.e. when the output-shape tensor is a constant (not in the files ``export_tflite`` writes, so not in
    KERNELS): the same accumulators, requantized in fp32 as CONV_2D (``integer_xnnpack.requantize_fp32``)."""
    (si, zi), (so, zo) = ins[0], out
    acc = transpose_conv_accumulators(xs[0], zi, weights, bias, stride, padding, output_size)
    scales = integer_xnnpack.requantization_scales(si, filter_scales, so, weights.shape[0])
    return integer_xnnpack.requantize_fp32(acc, scales, zo, *integer_xnnpack.activation_range(activation, so, zo))


KERNELS = {
    "resize_nearest": {"reference": resize_nearest, "xnnpack": resize_nearest},
    "resize_bilinear": {"reference": resize_bilinear_reference, "xnnpack": resize_bilinear_xnnpack},
    "transpose_conv": {"reference": transpose_conv, "xnnpack": transpose_conv},
}
