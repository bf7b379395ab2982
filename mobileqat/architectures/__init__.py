"""Quantization-friendly MobileNet builders (functional tf-keras models, no pretrained weights)."""
from mobileqat.architectures.mobilenet_v1 import mobilenet_v1
from mobileqat.architectures.mobilenet_v2 import mobilenet_v2

BUILDERS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2}

__all__ = ["BUILDERS", "mobilenet_v1", "mobilenet_v2"]
