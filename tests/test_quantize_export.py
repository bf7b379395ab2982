"""quantize() -> QAT model -> full-integer TFLite; the simulation agrees with the reference kernels."""
import numpy as np
import pytest

from mobileqat import export, harness
from mobileqat._tf import keras
from mobileqat.export import save_keras_model
from mobileqat.provenance import FileMismatchError
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def small_net(input_shape=(16, 16, 3), classes=4):
    inp = keras.Input(input_shape)
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv_a")(inp)
    x = L.ReLU(6.0, name="relu_a")(L.BatchNormalization(name="bn_a")(x))
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.ReLU(6.0, name="relu_dw")(L.BatchNormalization(name="bn_dw")(x))
    y = L.BatchNormalization(name="bn_b")(L.Conv2D(8, 1, use_bias=False, name="conv_b")(x))
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Activation("softmax", name="softmax")(L.Dense(classes, name="dense")(x))
    return keras.Model(inp, x, name="small_net")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (128, 16, 16, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    qat = quantize(small_net())
    qat.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(x, y, epochs=2, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("export")
    path = str(folder / "qat.tflite")
    export.export_tflite(qat, path, "qat_int8")
    return qat, path, x, y, folder


def test_quantize_folds_every_bn_and_wraps_every_layer():
    qat = quantize(small_net())
    inner = [type(getattr(layer, "layer", layer)).__name__ for layer in qat.layers]
    assert "BatchNormalization" not in inner and inner.count("FoldedConvBN") == 3
    assert all(type(layer).__name__ in ("InputLayer", "QuantizeLayer", "QuantizeWrapperV2") for layer in qat.layers)


def test_single_conv_layer_simulation_matches_reference_kernels(tmp_path):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    inp = keras.Input((12, 12, 3))
    out = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
    qat = quantize(keras.Model(inp, out))
    x = rng.uniform(-1, 1, (64, 12, 12, 3)).astype(np.float32)
    qat.compile("adam", "mse")
    qat.fit(x, rng.uniform(0, 6, (64, 12, 12, 16)), epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "one.tflite")
    export.export_tflite(qat, path, "qat_int8")
    m = TFLiteModel(path, "reference")
    raw = m.predict(x)
    scale, zero = m.output_quantization
    sim = harness.simulate(qat, x, path)
    diff = np.abs(harness.quantize_output(sim, scale, zero, "int8") - raw)
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_export_io_types_and_full_integer(trained, io_type):
    qat, _, x, _, folder = trained
    path = folder / f"qat_{io_type}.tflite"
    size = export.export_tflite(qat, path, "qat_int8", io_type=io_type)
    types = export.tensor_types(path)
    assert size == path.stat().st_size
    assert types["input"] == io_type and types["output"] == io_type and types["float_ops"] == []


def test_export_float_and_ptq(trained):
    qat, _, x, _, folder = trained
    float_model = small_net()
    export.export_tflite(float_model, folder / "f.tflite", "float")
    assert export.tensor_types(folder / "f.tflite")["input"] == "float32"
    export.export_tflite(float_model, folder / "p.tflite", "ptq_int8", representative_data=x[:16])
    t = export.tensor_types(folder / "p.tflite")
    assert (t["input"], t["output"], t["float_ops"]) == ("int8", "int8", [])
    with pytest.raises(ValueError, match="representative_data"):
        export.export_tflite(float_model, folder / "none.tflite", "ptq_int8")
    assert not (folder / "none.tflite").exists()
    with pytest.raises(ValueError, match="no fake-quant"):
        export.export_tflite(float_model, folder / "none.tflite", "qat_int8")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import os
    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        export.write_atomic(tmp_path / "x.tflite", b"123")
    assert list(tmp_path.iterdir()) == []


def test_harness_agrees_on_true_model_and_catches_mismatched_one(trained):
    qat, path, x, y, _ = trained
    good = harness.validate(path, x, y, model=qat)
    for name in ("reference", "xnnpack"):
        r = good["runtimes"][name]
        # a barely trained 4-class net: near-tied softmax codes flip top-1 on a 1-LSB difference
        assert r["max_lsb_diff"] <= 2 and r["frac_within_1lsb"] > 0.99 and r["top1_agreement"] > 0.85
    wrong = quantize(small_net())  # the same weights, then the classifier's bias moved by +-4
    wrong.set_weights(qat.get_weights())
    wrapper = next(layer for layer in wrong.layers if layer.name == "quant_dense")
    bias = next(w for w in wrapper.trainable_weights if "bias" in w.name)
    bias.assign(bias + np.array([4.0, 0.0, -4.0, 0.0], np.float32))
    with pytest.raises(FileMismatchError, match=r"bias of layer 'quant_dense'"):  # no numbers for a foreign file
        harness.validate(path, x, y, model=wrong, runtimes=("reference",))


def test_qat_model_saves_and_loads_without_custom_objects(trained, tmp_path):
    qat, _, x, _, _ = trained
    path = str(tmp_path / "qat.h5")
    save_keras_model(qat, path)
    loaded = load_qat_model(path)
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), qat.predict(x[:8], verbose=0), atol=1e-6)


def test_unsupported_layers_are_named_in_one_error():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="elu", name="elu_conv")(inp)
    x = L.LayerNormalization(axis=1, name="ln")(x)  # over rows: no int8 form (over channels there is one)
    x = L.Dense(3, name="head")(L.Flatten()(x))
    with pytest.raises(ValueError) as err:
        quantize(keras.Model(inp, x))
    msg = str(err.value)
    assert "'elu_conv' (Conv2D)" in msg and "'ln' (LayerNormalization)" in msg and "Activation layer" in msg


def test_debug_fidelity_matches_every_layer_and_localises_error(trained, tmp_path):
    from mobileqat import debug
    qat, path, x, _, _ = trained
    result = debug.debug_fidelity(qat, path, x[:32])
    rows = {r["layer"]: r for r in result["layers"]}
    assert {"conv_a", "dw", "conv_b", "add", "pool", "dense", "softmax"} <= set(rows)
    assert rows["softmax"]["op"] == "SOFTMAX" and rows["softmax"]["tflite_scale"] == 1 / 256
    for r in result["layers"]:
        if r["keras_scale"] is not None:  # the simulation holds the same quantization as the file
            assert r["keras_scale"] == pytest.approx(r["tflite_scale"], rel=1e-5)
            assert r["keras_zero_point"] == r["tflite_zero_point"]
        assert r["local_max_lsb_diff"] is None or r["local_max_lsb_diff"] <= 1  # each op on its own
    assert "first layer over" in debug.format_table(result)
    debug.write_json(result, tmp_path / "d.json")
    assert debug.plot(result, tmp_path / "d.png") and (tmp_path / "d.png").stat().st_size > 1000


def test_debug_names_the_layer_whose_weights_left_the_file(trained, tmp_path):
    from mobileqat import debug
    qat, path, x, _, _ = trained
    save_keras_model(qat, tmp_path / "copy.h5")
    wrong = load_qat_model(tmp_path / "copy.h5")  # same layer names as the exported model
    wrapper = next(layer for layer in wrong.layers if isinstance(getattr(layer, "layer", None), L.Dense))
    kernel = next(w for w in wrapper.trainable_weights if "kernel" in w.name)
    kernel.assign(kernel * 1.5)
    with pytest.raises(FileMismatchError, match=f"weights of layer '{wrapper.name}'"):
        debug.debug_fidelity(wrong, path, x[:32])
