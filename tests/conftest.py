import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def numpy_fake_quant(x, qmin_f, qmax_f, num_bits=8, narrow_range=False):
    """TensorFlow's FakeQuantWithMinMax arithmetic (fake_quant_ops_functor.h), written in numpy.

    qmin_f/qmax_f broadcast against x (per-channel ranges on the last axis)."""
    x = np.asarray(x, np.float64)
    qmin_f, qmax_f = np.asarray(qmin_f, np.float64), np.asarray(qmax_f, np.float64)
    quant_min, quant_max = (1 if narrow_range else 0), 2 ** num_bits - 1
    scale = (qmax_f - qmin_f) / (quant_max - quant_min)
    zp_from_min = quant_min - qmin_f / scale
    nudged_zp = np.where(zp_from_min < quant_min, quant_min,
                         np.where(zp_from_min > quant_max, quant_max, np.floor(zp_from_min + 0.5)))
    nudged_min = (quant_min - nudged_zp) * scale
    nudged_max = (quant_max - nudged_zp) * scale
    clamped = np.clip(x, nudged_min, nudged_max)
    q = np.floor((clamped - nudged_min) / scale + 0.5)
    return q * scale + nudged_min


@pytest.fixture
def rng():
    return np.random.default_rng(0)
