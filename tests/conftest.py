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


def tiny_qat_model(seed, width=6, extra_conv=False):
    """A trained-for-one-epoch QAT model (12x12x3 -> 4 classes): conv+BN+ReLU6 [, conv+BN], GAP, Dense,
    softmax. Different seeds give different weights; ``extra_conv`` a different op sequence."""
    from mobileqat._tf import keras
    from mobileqat.quantize import quantize
    L = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(width, 3, strides=2, padding="same", use_bias=False,
                                                     name="stem")(inp)))
    if extra_conv:
        x = L.BatchNormalization()(L.Conv2D(width, 1, use_bias=False, name="extra")(x))
    x = L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Activation("softmax")(x))
    x, y = tiny_data()
    qat = quantize(model)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, verbose=0)
    return qat


def tiny_data(n=64):
    """(x (n, 12, 12, 3) float32 in [-1, 1], y (n,) in 0..3), fixed."""
    rng = np.random.default_rng(3)
    return rng.uniform(-1, 1, (n, 12, 12, 3)).astype(np.float32), rng.integers(0, 4, n)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Folder with a.h5 / b.h5 (same architecture, other weights), c.h5 (one more conv), a.tflite
    exported from a, and x.npy (24 images)."""
    from mobileqat.export import export_tflite
    folder = tmp_path_factory.mktemp("tiny")
    models = {"a": tiny_qat_model(3), "b": tiny_qat_model(4), "c": tiny_qat_model(3, extra_conv=True)}
    for name, qat in models.items():
        qat.save(folder / f"{name}.h5")
    export_tflite(models["a"], folder / "a.tflite")
    np.save(folder / "x.npy", tiny_data()[0][:24])
    return folder


def user_cnn_files(root, jpeg_every_other=False):
    """A user's folder and trained model under ``root``: data/class_{0,1,2}/ with 16 images each (a coloured block
    on 24x30 noise; PNG, or PNG and JPEG alternating) and a small functional CNN (Conv2D+BN+ReLU,
    DepthwiseConv2D+BN+ReLU6, Add, GAP, Dense, softmax) on 16x20 inputs scaled to 0..1, trained 3 epochs, saved as
    user.keras and user.h5. Returns ``root``."""
    from PIL import Image

    from mobileqat._tf import keras
    from mobileqat.data import image_folder_stream
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(255, 40, 40), (40, 40, 255), (40, 255, 40)]):
        (root / "data" / f"class_{c}").mkdir(parents=True)
        for i in range(16):
            img = rng.integers(0, 60, (24, 30, 3), dtype=np.uint8)
            img[5:15, 6:20] = colour
            ext = "jpg" if jpeg_every_other and i % 2 == 0 else "png"
            Image.fromarray(img).save(root / "data" / f"class_{c}" / f"{i}.{ext}")
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 20, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)))
    x = L.Add()([x, L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(y))])
    model = keras.Model(inp, L.Activation("softmax")(L.Dense(3)(L.GlobalAveragePooling2D()(x))), name="user_cnn")
    stream = image_folder_stream(root / "data", (16, 20), 3, pixels="0..1")
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(stream.dataset("train", 16), epochs=3, verbose=0)
    model.save(root / "user.keras")
    model.save(root / "user.h5")
    return root


def labelled_noise(n, seed):
    """n uniform-noise images (n, 16, 16, 3) in [-1, 1], channel 0 scaled per image, and labels (n,) in 0..4 from
    channel 0's spread and channel 1's mean: a small task a tiny CNN learns in a few epochs."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32)
    x[..., 0] *= rng.uniform(0.2, 1.0, (n, 1, 1))
    y = ((x[..., 0].std(axis=(1, 2)) > 0.35).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)) % 5
    return x, y


def assert_twin_matches_file(qat, x, path):
    """Export ``qat`` (ranges already set) to ``path`` and check that ``mobileqat.lower(qat)`` gives the file's
    output codes for images ``x`` exactly, on the reference kernels and on XNNPACK."""
    from mobileqat import export, lowering
    from mobileqat.runtime import TFLiteModel
    export.export_tflite(qat, path)
    twin = lowering.lower(qat)
    for runtime in ("reference", "xnnpack"):
        f = TFLiteModel(str(path), runtime)
        codes = f.quantize_input(x)
        np.testing.assert_array_equal(f.invoke_raw(codes).astype(np.int64), twin.run(codes, runtime).astype(np.int64))


def assert_twin_matches_and_xnnpack_takes_all_but_softmax(qat, x, path):
    """Set ``qat``'s ranges on ``x`` (one training-mode pass), then ``assert_twin_matches_file``, and check with
    the runtime's own count that XNNPACK takes every op of the file but its SOFTMAX."""
    from mobileqat import runtime
    qat(x, training=True)
    assert_twin_matches_file(qat, x, path)
    cover, error = runtime.run_isolated(runtime.xnnpack_coverage, str(path), timeout=600)
    assert error is None and cover["left"] == {"SOFTMAX": 1}, cover
