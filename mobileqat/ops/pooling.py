"""Pooling, padding and cropping ops: reference and XNNPACK arithmetic side by side (see mobileqat.ops).

Every op here but MEAN keeps its input's scale and zero point (the converter gives its output tensor the
input's quantization, and the kernels read raw codes), so ``quantize`` makes the Keras layers pass-through.
Sources read (LiteRT at ai-edge-litert 2.3): ``tflite/kernels/{pooling,pad,reduce,strided_slice}.cc``,
``kernels/internal/reference/integer_ops/pooling.h``, ``internal/optimized/integer_ops/pooling.h``,
``tflite/delegates/xnnpack/xnnpack_delegate.cc`` (Visit{AveragePool2D,MaxPool2D,Reduce,Pad,StridedSlice}Node).

  MAX_POOL_2D (MaxPooling2D): max of the raw codes in each window; 'SAME' padding positions are skipped
      (not compared), then the fused-activation clamp (none from Keras). XNNPACK takes int8 max pooling
      (qs8, same quantization in and out): the same integers, no arithmetic to differ.
  AVERAGE_POOL_2D (AveragePooling2D): acc = sum of the raw int8 codes (zero point not subtracted: in and
      out share it) over the window positions inside the input, n = their count ('SAME' counts exclude
      the padding); y = acc > 0 ? (acc + n/2) / n : (acc - n/2) / n in C integer division, i.e. round
      half away from zero in code space. The XNNPACK delegate takes float average pooling only, so the
      default path runs optimized_integer_ops::AveragePool: the same int32 sums and the same rounding.
  PAD (ZeroPadding2D): constant padding with the zero point (pad.cc: output zero point; XNNPACK's static
      constant pad with 0.0 quantized to the zero point).
  MEAN over H, W (GlobalAveragePooling2D, keepdims or not): the existing ``integer.mean_hw`` (reference
      QuantizedMeanOrSum; keep_dims changes the output shape only, reduce.cc EvalQuantizedMean) and
      ``integer_xnnpack.mean_hw`` (the delegate's static reduce with XNN_FLAG_KEEP_DIMS), reshaped.
  REDUCE_MAX over H, W (GlobalMaxPooling2D): max of the raw codes (both runtimes; XNNPACK reduce max).
  STRIDED_SLICE (Cropping2D): a copy of the kept window (both runtimes).
"""
import numpy as np

from mobileqat import integer, integer_xnnpack


def _same_quantization(op, ins, out):
    """The ops here that move codes need the output to keep the input's scale and zero point."""
    (si, zi), (so, zo) = ins[0], out
    if np.float32(si) != np.float32(so) or int(zi) != int(zo):
        raise ValueError(f"{op} keeps its input's quantization: input {np.float32(si):.9g}/{zi}, output "
                         f"{np.float32(so):.9g}/{zo} (the converter writes a QUANTIZE after it; not reproduced)")


def _windows(x, pool, stride, padding, pad_value):
    return integer._patches(np.asarray(x, np.int64), pool[0], pool[1], tuple(stride), padding, pad_value)


def max_pool2d(xs, ins, out, pool, stride, padding, act_range=(-128, 127)):
    """int8 MAX_POOL_2D (reference_integer_ops::MaxPool; XNNPACK qs8 max pooling): (N,H,W,C) -> (N,OH,OW,C)."""
    _same_quantization("MAX_POOL_2D", ins, out)
    y = _windows(xs[0], pool, stride, padding, pad_value=-(1 << 20)).max(axis=(3, 4))  # padding never wins
    return np.clip(y, *act_range).astype(np.int8)


def average_pool2d(xs, ins, out, pool, stride, padding, act_range=(-128, 127)):
    """int8 AVERAGE_POOL_2D (reference_integer_ops::AveragePool = optimized_integer_ops::AveragePool):
    sums of raw codes over the window positions inside the input, divided by their count with
    round half away from zero."""
    _same_quantization("AVERAGE_POOL_2D", ins, out)
    acc = _windows(xs[0], pool, stride, padding, pad_value=0).sum(axis=(3, 4))
    count = _windows(np.ones_like(xs[0]), pool, stride, padding, pad_value=0).sum(axis=(3, 4))
    half = count // 2
    y = np.where(acc > 0, (acc + half) // count, -((half - acc) // count))  # C division truncates to zero
    return np.clip(y, *act_range).astype(np.int8)


def pad(xs, ins, out, paddings):
    """int8 PAD of H and W, ((top, bottom), (left, right)), with the zero point."""
    _same_quantization("PAD", ins, out)
    (top, bottom), (left, right) = paddings
    return np.pad(np.asarray(xs[0], np.int8), ((0, 0), (top, bottom), (left, right), (0, 0)),
                  constant_values=np.int8(ins[0][1]))


def strided_slice(xs, ins, out, cropping):
    """int8 STRIDED_SLICE of H and W as Cropping2D writes it, ((top, bottom), (left, right)) cut off."""
    _same_quantization("STRIDED_SLICE", ins, out)
    (top, bottom), (left, right) = cropping
    x = np.asarray(xs[0], np.int8)
    return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :].copy()


def reduce_max_hw(xs, ins, out, keepdims=False):
    """int8 REDUCE_MAX over H and W: (N,H,W,C) -> (N,C), or (N,1,1,C) with keepdims."""
    _same_quantization("REDUCE_MAX", ins, out)
    return np.asarray(xs[0], np.int8).max(axis=(1, 2), keepdims=keepdims)


def _mean(arith):
    def mean_hw(xs, ins, out, keepdims=False):
        y = arith.mean_hw(xs[0], ins[0][0], ins[0][1], out[0], out[1])
        return y.reshape(len(y), 1, 1, -1) if keepdims else y
    mean_hw.__doc__ = (f"int8 MEAN over H and W with {arith.__name__}.mean_hw: (N,H,W,C) -> (N,C), or "
                       "(N,1,1,C) with keepdims.")
    return mean_hw


def _same_on_both(fn):
    return {"reference": fn, "xnnpack": fn}


KERNELS = {
    "max_pool2d": _same_on_both(max_pool2d),
    "average_pool2d": _same_on_both(average_pool2d),  # not delegated: the optimized kernel, same integers
    "pad": _same_on_both(pad),
    "strided_slice": _same_on_both(strided_slice),
    "reduce_max_hw": _same_on_both(reduce_max_hw),
    "mean_hw": {"reference": _mean(integer), "xnnpack": _mean(integer_xnnpack)},
}
