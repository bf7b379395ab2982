"""import mobileqat selects Keras 2; after TensorFlow chose Keras 3 it refuses with a fix."""
import os
import subprocess
import sys


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    full.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_fresh_import_uses_keras2():
    r = _python("import mobileqat; from mobileqat._tf import tf, keras; "
                "print(tf.keras.__name__.split('.')[0], keras.__version__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tf_keras", "2.21.0"]


def test_tensorflow_first_with_legacy_flag_is_fine():
    r = _python("import tensorflow as tf; import mobileqat; mobileqat.quantize", TF_USE_LEGACY_KERAS="1")
    assert r.returncode == 0, r.stderr


def test_keras3_already_active_is_a_clear_error():
    r = _python("import tensorflow as tf; tf.keras.__version__; import mobileqat")
    assert r.returncode != 0
    assert "TF_USE_LEGACY_KERAS=1" in r.stderr and "import mobileqat before tensorflow" in r.stderr


def test_runtime_module_needs_no_tensorflow():
    r = _python("import sys, mobileqat.runtime; print('tensorflow' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
