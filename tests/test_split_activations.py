"""transforms.split_activations: softmax/sigmoid fused into Conv/Dense become their own layer, so models
whose classifier is Dense(activation="softmax") quantize, export and lower exactly."""
import numpy as np
import pytest

from mobileqat import export, lowering
from mobileqat._tf import keras
from mobileqat.quantize import audit, quantize
from mobileqat.runtime import TFLiteModel
from mobileqat.transforms import split_activations

L = keras.layers


def fused_head_net(gate=True):
    """[Conv2D(sigmoid) ->] conv+BN+ReLU6 -> GAP -> Dense(softmax). The gate has no twin op yet."""
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, padding="same", activation="sigmoid", name="gate")(inp) if gate else inp
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(6, 3, strides=2, use_bias=False, name="conv")(x)))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="predictions")(x))


def test_split_keeps_the_function_and_the_weights():
    keras.utils.set_random_seed(0)
    model = fused_head_net()
    split = split_activations(model)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 10, 10, 3)).astype(np.float32)
    np.testing.assert_allclose(split.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7)
    names = [layer.name for layer in split.layers]
    assert names.index("gate_sigmoid") == names.index("gate") + 1
    assert names[-2:] == ["predictions", "predictions_softmax"]
    assert split.get_layer("predictions").get_config()["activation"] == "linear"
    assert split.get_layer("predictions_softmax").get_config()["activation"] == "softmax"


def test_a_dense_softmax_classifier_quantizes_exports_and_lowers_exactly(tmp_path):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (64, 10, 10, 3)).astype(np.float32)
    model = fused_head_net(gate=False)
    assert audit(model) == []
    qat = quantize(model)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, rng.integers(0, 3, 64), epochs=1, verbose=0)
    path = tmp_path / "m.tflite"
    export.export_tflite(qat, path)
    twin = lowering.lower(qat)
    assert [op.kind for op in twin.ops][-2:] == ["fully_connected", "softmax"]
    for runtime in ("reference", "xnnpack"):
        m = TFLiteModel(path, runtime)
        np.testing.assert_array_equal(twin.run(m.quantize_input(x), runtime), m.predict(x))


@pytest.mark.parametrize("name", ["MobileNetV2", "VGG16", "ResNet50"])
def test_applications_with_a_softmax_classifier_pass_the_audit(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10)
    assert audit(model) == []
