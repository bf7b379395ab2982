"""Quantization-friendly builders (functional tf-keras models, no pretrained weights), one per module.

``BUILDERS``: family name -> builder function. ``MODELS``: the named models of ``mobileqat demo/run
--model`` -> (builder, fixed keyword arguments); ``build(name, input_shape, classes, alpha)`` makes one.
"""
import inspect

from mobileqat.architectures.efficientnet_lite import efficientnet_lite
from mobileqat.architectures.mobilenet_v1 import mobilenet_v1
from mobileqat.architectures.mobilenet_v2 import mobilenet_v2
from mobileqat.architectures.mobilenet_v3 import mobilenet_v3
from mobileqat.architectures.resnet_small import resnet_small

BUILDERS = {"mobilenet_v1": mobilenet_v1, "mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3,
            "efficientnet_lite": efficientnet_lite, "resnet_small": resnet_small}

MODELS = {"mobilenet_v1": (mobilenet_v1, {}), "mobilenet_v2": (mobilenet_v2, {}),
          **{f"mobilenet_v3_{v}{'_minimalistic' if m else ''}": (mobilenet_v3, {"variant": v, "minimalistic": m})
             for v in ("small", "large") for m in (False, True)},
          **{f"efficientnet_lite_{v}": (efficientnet_lite, {"variant": v}) for v in ("b0", "b1", "b2")},
          **{f"resnet{d}": (resnet_small, {"depth": d}) for d in (20, 32, 56)}}


def takes_alpha(name):
    """True when the model ``name`` of ``MODELS`` has a width multiplier ``alpha``."""
    return "alpha" in inspect.signature(MODELS[name][0]).parameters


def build(name, input_shape, classes, alpha=None):
    """The model ``name`` of ``MODELS`` for (H, W, C) images and ``classes`` classes.

    alpha: width multiplier, for the models that have one (None: the builder's default); given to a
    model without one, a ValueError.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)}.")
    builder, fixed = MODELS[name]
    kwargs = dict(fixed, input_shape=input_shape, classes=classes)
    if alpha is not None:
        if not takes_alpha(name):
            raise ValueError(f"model {name!r} has no width multiplier (alpha={alpha!r}); alpha applies to "
                             f"{', '.join(m for m in sorted(MODELS) if takes_alpha(m))}.")
        kwargs["alpha"] = alpha
    return builder(**kwargs)


__all__ = ["BUILDERS", "MODELS", "build", "efficientnet_lite", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3",
           "resnet_small", "takes_alpha"]
