"""The one module that imports TensorFlow, tf-keras (Keras 2) and tfmot.

Everything else in mobileqat does ``from mobileqat._tf import tf, keras, tfmot``.
Importing this module selects Keras 2 (tf-keras) by setting ``TF_USE_LEGACY_KERAS=1``
before TensorFlow is imported; if TensorFlow was already imported with Keras 3
active, it raises an ImportError that says what to do.
"""
import os
import sys

_FIX = (
    "mobileqat needs Keras 2 (tf-keras), but TensorFlow was imported earlier with Keras 3 active "
    "(tf.keras is keras {version}). Fix: import mobileqat before tensorflow, or set the environment "
    "variable TF_USE_LEGACY_KERAS=1 before Python starts (export TF_USE_LEGACY_KERAS=1)."
)

_tf_was_imported = "tensorflow" in sys.modules
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ["TF_USE_LEGACY_KERAS"].lower() not in ("1", "true", "yes"):
    raise ImportError(_FIX.format(version="3 (TF_USE_LEGACY_KERAS=%s)" % os.environ["TF_USE_LEGACY_KERAS"]))

import tensorflow as tf  # noqa: E402

if _tf_was_imported and not getattr(tf.keras, "__name__", "").startswith("tf_keras"):
    raise ImportError(_FIX.format(version=getattr(tf.keras, "__version__", "3")))

import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras", "tfmot"]
