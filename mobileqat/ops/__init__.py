"""Integer ops by family: each module holds, side by side, one op's arithmetic on the reference kernels
and on LiteRT's default path (XNNPACK, or the builtin optimized kernel where XNNPACK does not take
the op), bit for bit, in numpy (no TensorFlow).

Every family module exports ``KERNELS = {kind: {"reference": fn, "xnnpack": fn}}``; every kernel has
the signature

    fn(xs, ins, out, **params) -> int8 array
      xs:     list of int8 input arrays (NHWC for images)
      ins:    list of (scale: np.float32, zero_point: int), one per input
      out:    (scale: np.float32, zero_point: int) of the output tensor
      params: the op's constants and options (pool size, padding, axis, ...), as ``lowering`` writes them

``KERNELS`` here is the union: ``IntegerModel`` dispatches any op kind listed in it.
"""
import importlib

FAMILIES = ("pooling", "elementwise", "activations", "resize", "int16x8", "normalization")

KERNELS = {}
for _family in FAMILIES:
    KERNELS.update(importlib.import_module(f"mobileqat.ops.{_family}").KERNELS)
