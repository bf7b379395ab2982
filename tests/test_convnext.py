"""ConvNeXt (tf_keras.applications.convnext) through quantize: LayerScale folds into the 1x1 conv before it,
GELU is one int8 GELU, the grouped 7x7 conv is a depthwise conv, Dense on (N, H, W, C) a 1x1 conv; what
is left, LayerNormalization, is refused in one error naming every such layer with the keep_float fix,
and kept float with keep_float=True: the file is int8 around float LayerNormalization ops, runs on the
reference kernels and XNNPACK, and validates against the float simulation (the integer twin names the
LayerNormalization it cannot lower).

A ConvNeXt with one block per stage and 8-32 channels (the same builder as ConvNeXtTiny) keeps the
conversion small; the real ConvNeXtTiny is audited only (it converts in ``mobileqat coverage``)."""
import warnings

import numpy as np
import pytest

from mobileqat import export, harness, lowering
from mobileqat._tf import keras
from mobileqat.quantize import audit, load_qat_model, quantize, rewrite
from mobileqat.runtime import xnnpack_coverage

LN_OPS = {"SQUARED_DIFFERENCE", "MEAN", "ADD", "RSQRT", "MUL", "SUB"}  # the converter's float LayerNormalization


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


def test_convnext_tiny_is_refused_only_for_layer_normalization():
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10)
    problems = audit(model)
    assert len(problems) == 23 and {p.cls for p in problems} == {"LayerNormalization"}
    assert all("keep_float=True" in p.fix and "allow_float_ops=True" in p.fix for p in problems)
    with pytest.raises(ValueError, match="(?s)23 problems.*'convnext_tiny_stem_layernorm' \\(LayerNormalization\\)"):
        quantize(model)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    model = mini_convnext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = quantize(model, keep_float=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path_factory.mktemp("convnext") / "convnext_mini.tflite")
    export.export_tflite(qat, path, allow_float_ops=True)
    return model, qat, path, x, y, [str(w.message) for w in caught]


def test_keep_float_keeps_only_the_layer_normalizations(kept):
    model, qat, path, _, _, messages = kept
    (message,) = [m for m in messages if "keep_float" in m]
    assert "keeping 9 layer(s)" in message and message.count("(LayerNormalization)") == 9
    names = {layer.name for layer in qat.layers}
    assert not any("layer_scale" in n for n in names)  # folded into pointwise_conv_2
    types = export.tensor_types(path)
    assert (types["input"], types["output"]) == ("int8", "int8")
    assert set(types["float_ops"]) <= LN_OPS and len(types["float_ops"]) == 9 * 9
    cover = xnnpack_coverage(path)
    assert cover["left"].get("GELU") == 4  # int8 GELU, the builtin table on both runtimes


def test_the_file_validates_on_both_runtimes(kept):
    _, qat, path, x, y, _ = kept
    result = harness.validate(path, x, y, model=qat)
    assert "LayerNormalization" in result["integer_path_error"]
    for runtime in ("reference", "xnnpack"):
        r = result["runtimes"][runtime]
        assert r["simulation"] == "float" and r["top1_agreement"] >= 0.9 and r["max_lsb_diff"] <= 16, r
    with pytest.raises(ValueError, match="LayerNormalization"):
        lowering.lower(qat)


def test_the_rewrites_keep_convnext_s_function():
    """LayerScale folded, grouped conv to depthwise, Dense on (N, H, W, C) to 1x1 conv, the classifier's
    softmax split: the same float function."""
    model = mini_convnext()
    x = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    rewritten = rewrite(model)
    kinds = [type(layer).__name__ for layer in rewritten.layers]
    assert "LayerScale" not in kinds and kinds.count("Dense") == 1 and kinds.count("DepthwiseConv2D") >= 4
    np.testing.assert_allclose(rewritten(x, training=False), model(x, training=False), rtol=1e-4, atol=1e-5)


def test_qat_convnext_reloads_from_h5(kept, tmp_path):
    _, qat, _, x, _, _ = kept
    qat.save(tmp_path / "convnext.h5")
    again = load_qat_model(tmp_path / "convnext.h5")
    np.testing.assert_array_equal(again(x[:4], training=False), qat(x[:4], training=False))
