"""ConvNeXt (tf_keras.applications.convnext) through quantize to a full-integer int8 file: LayerScale folds into
the 1x1 conv before it, GELU is one int8 GELU, the grouped 7x7 conv is a depthwise conv, Dense on (N, H, W, C) a
1x1 conv, the identity Activation('linear') disappears, and LayerNormalization is six int8 ops (MEAN, SUB, MUL,
MEAN, RSQRT, MUL; its gamma and beta fold into the conv or Dense after it, or, after the stem, a 1x1 depthwise).
The file runs on the reference kernels and XNNPACK and the integer twin reproduces it at 0 LSB on both.
keep_float still keeps named LayerNormalization layers float.

A ConvNeXt with one block per stage and 8-32 channels (the same builder as ConvNeXtTiny) keeps the
conversion small; the real ConvNeXtTiny is audited only (it converts in ``mobileqat coverage``)."""
import warnings

import numpy as np
import pytest

from mobileqat import export, harness, lowering, provenance, transforms
from mobileqat._tf import keras
from mobileqat.quantize import _audit, load_qat_model, quantize, rewrite
from mobileqat.runtime import TFLiteModel, xnnpack_coverage

LN_OPS = ["MEAN", "SUB", "MUL", "MEAN", "RSQRT", "MUL"]  # one LayerNormalization, in the file's order


def mini_convnext():
    from tf_keras.src.applications.convnext import ConvNeXt
    keras.utils.set_random_seed(0)
    model = ConvNeXt([1, 1, 1, 1], [8, 16, 24, 32], input_shape=(32, 32, 3), classes=10, model_name="convnext_mini",
                     default_size=32)
    rng = np.random.default_rng(0)  # LayerScale away from its 1e-6 start, so that folding it matters
    for layer in model.layers:
        if type(layer).__name__ == "LayerScale":
            layer.set_weights([rng.uniform(0.2, 1.0, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model



def test_convnext_tiny_is_accepted_with_every_layer_normalization_rewritten():
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10)
    problems, rewritten = _audit(model)  # audit() and rewrite() in one pass (the rewrites take minutes here)
    assert problems == []
    kinds = [type(layer).__name__ for layer in rewritten.layers]
    assert kinds.count("LayerNormCore") == 23 and "LayerNormalization" not in kinds
    assert kinds.count("DepthwiseConv2D") == 18 + 1 + 1  # the 7x7 convs, the stem LN's gamma and beta, the input Normalization


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = mini_convnext()
    qat = quantize(model)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path_factory.mktemp("convnext") / "convnext_mini.tflite")
    export.export_tflite(qat, path)
    return model, qat, path, x, y


def test_the_file_is_full_int8(exported):
    _, qat, path, _, _ = exported
    names = {layer.name for layer in qat.layers}
    assert not any("layer_scale" in n or n.endswith("_identity") for n in names)
    types = export.tensor_types(path)
    assert (types["input"], types["output"], types["float_ops"]) == ("int8", "int8", [])
    from ai_edge_litert.interpreter import Interpreter
    ops = [op["op_name"] for op in Interpreter(path)._get_ops_details()]
    starts = [i for i in range(len(ops)) if ops[i:i + 6] == LN_OPS]
    assert len(starts) == 9  # stem, 4 blocks, 3 downsampling, head
    assert xnnpack_coverage(path)["left"] == {"RSQRT": 9, "GELU": 4, "SOFTMAX": 1}  # builtin kernels both runtimes


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_twin_equals_the_file(exported, runtime):
    _, qat, path, x, _ = exported
    twin = lowering.lower(qat)
    assert provenance.first_difference(twin, path) is None
    m = TFLiteModel(path, runtime)
    codes = m.quantize_input(np.concatenate([x, np.random.default_rng(3).uniform(0, 255, (32, 32, 32, 3))]))
    np.testing.assert_array_equal(twin.run(codes, runtime), m.invoke_raw(codes))


def test_the_file_validates_on_both_runtimes(exported):
    _, qat, path, x, y = exported
    result = harness.validate(path, x, y, model=qat)
    assert not result.get("integer_path_error")
    for runtime in ("reference", "xnnpack"):
        r = result["runtimes"][runtime]
        assert r["simulation"] == "integer" and r["max_lsb_diff"] == 0 and r["top1_agreement"] == 1.0, r


def test_keep_float_still_keeps_named_layer_normalizations():
    model = mini_convnext()
    flat = transforms.flatten_nested(model)  # the stem's LayerNormalization is in a nested Sequential
    names = [layer.name for layer in flat.layers if type(layer).__name__ == "LayerNormalization"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = quantize(model, keep_float=names)
    (message,) = [str(w.message) for w in caught if "keep_float" in str(w.message)]
    assert "keeping 9 layer(s)" in message
    inner = [type(getattr(layer, "layer", layer)).__name__ for layer in qat.layers]
    assert inner.count("LayerNormalization") == 9 and "LayerNormCore" not in inner
    qat(np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32), training=True)  # ranges
    with pytest.raises(ValueError, match="LayerNormalization"):
        lowering.lower(qat)


def test_the_rewrites_keep_convnext_s_function():
    """LayerScale folded, grouped conv to depthwise, Dense on (N, H, W, C) to 1x1 conv, the classifier's
    softmax split, identities dropped, LayerNormalization as LayerNormCore with gamma and beta folded: the
    same float function."""
    model = mini_convnext()
    x = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    rewritten = rewrite(model)
    kinds = [type(layer).__name__ for layer in rewritten.layers]
    assert "LayerScale" not in kinds and kinds.count("Dense") == 1 and kinds.count("DepthwiseConv2D") == 4 + 1 + 1  # 7x7 convs, stem LN affine, input Normalization
    assert kinds.count("LayerNormCore") == 9 and "LayerNormalization" not in kinds
    np.testing.assert_allclose(rewritten(x, training=False), model(x, training=False), rtol=1e-4, atol=1e-5)


def test_qat_convnext_reloads_from_h5(exported, tmp_path):
    _, qat, _, x, _ = exported
    qat.save(tmp_path / "convnext.h5")
    again = load_qat_model(tmp_path / "convnext.h5")
    np.testing.assert_array_equal(again(x[:4], training=False), qat(x[:4], training=False))
