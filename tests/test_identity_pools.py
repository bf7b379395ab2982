"""A global pool with keepdims over a 1 x 1 feature map (MobileNetV3's squeeze-excite and head at 32 x 32 inputs) is
the identity. The converter removes such a MEAN: its reader takes the pool's input codes at the input's scale,
with its bias quantized at the pool's own output scale. After QAT the file then differed from the integer twin by
up to 10 LSB (tf_keras MobileNetV3Small, `mobileqat auto`, mixed plan). ``transforms.drop_identity_pools``
removes such a pool: same function as the original Keras model, and the twin matches the file at 0 LSB on both
runtimes."""
import numpy as np

from conftest import assert_twin_matches_file
from mobileqat import export, runtime, transforms
from mobileqat._tf import keras
from mobileqat.quantize import quantize

L = keras.layers


def se_at_1x1():
    keras.utils.set_random_seed(0)
    inp = keras.Input((2, 2, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)))
    se = L.GlobalAveragePooling2D(keepdims=True, name="se_squeeze")(x)  # (N, 1, 1, 8)
    se = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(L.Conv2D(4, 1, activation="relu")(se))
    x = L.Multiply(name="se_excite")([x, se])
    x = L.GlobalMaxPooling2D(name="head_pool")(L.Conv2D(16, 1, activation="relu", name="head")(x))
    model = keras.Model(inp, L.Dense(4, activation="softmax")(x))
    rng = np.random.default_rng(1)
    for layer in model.layers:  # biases that matter: the file quantizes them at the pool's scale
        if isinstance(layer, L.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.uniform(-0.5, 0.5, layer.bias.shape).astype(np.float32))
    return model


def _x(n=16):
    return np.random.default_rng(0).uniform(-1, 1, (n, 2, 2, 3)).astype(np.float32)


def test_rewrite_keeps_the_function_and_drops_the_pools():
    m = se_at_1x1()
    r = transforms.drop_identity_pools(m)
    assert "se_squeeze" not in [layer.name for layer in r.layers]
    assert type(r.get_layer("head_pool")) is L.GlobalMaxPooling2D  # no keepdims: the file keeps its op
    np.testing.assert_array_equal(r.predict(_x(), verbose=0), m.predict(_x(), verbose=0))
    inp = keras.Input((2, 2, 8))  # a pool over more than one position is left as it is
    wider = keras.Model(inp, L.GlobalAveragePooling2D()(inp))
    assert transforms.drop_identity_pools(wider) is wider


def test_the_converter_removes_a_1x1_mean_and_keeps_its_scale_in_the_bias(tmp_path, monkeypatch):
    """What the rewrite avoids, read from the file: with the pool kept (and its range apart from its input's),
    the reader's input is the pool's input tensor while its bias is quantized at the pool's scale."""
    import importlib
    quantize_module = importlib.import_module("mobileqat.quantize")
    monkeypatch.setattr(quantize_module, "REWRITES",
                        tuple(r for r in quantize_module.REWRITES if r is not transforms.drop_identity_pools))
    q = quantize(se_at_1x1())
    q(_x(64), training=True)
    pool = q.get_layer("quant_se_squeeze")
    for v in pool.weights:
        if "output_max" in v.name:
            v.assign(v * 0.9)
    path = str(tmp_path / "kept.tflite")
    export.export_tflite(q, path)
    details = runtime.TFLiteModel(path, "reference").interpreter
    tensors = {t["index"]: t for t in details.get_tensor_details()}
    ops = details._get_ops_details()
    assert "MEAN" not in [op["op_name"] for op in ops]
    reader = [op for op in ops if op["op_name"] == "CONV_2D"][1]  # the squeeze-excite's first conv
    x, w, b = (tensors[i]["quantization_parameters"]["scales"] for i in reader["inputs"][:3])
    assert not np.allclose(b / w, x[0], rtol=1e-3)  # bias at the pool's scale, input at its input's


def test_twin_matches_the_file_after_training(tmp_path):
    q = quantize(se_at_1x1())
    assert not any("se_squeeze" in layer.name for layer in q.layers)
    x = _x(64)
    for i in range(20):  # ranges move apart as in a fine-tune (the pool's would have trailed its input's)
        q(x * (1.0 + 0.05 * i), training=True)
    assert_twin_matches_file(q, x, str(tmp_path / "se1x1.tflite"))
