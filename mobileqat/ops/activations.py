"""activations ops: reference and XNNPACK arithmetic side by side (see mobileqat.ops)."""

KERNELS = {}
