"""Identical activations reading one tensor (NASNet's stem: one BatchNormalization read by five
Activation('relu')). The converter merges them into one op, and fuses that ReLU into the conv when it is the
conv's only reader; ``transforms.merge_duplicate_activations`` makes the QAT model hold the same graph, so the
twin reproduces the file at 0 LSB on both runtimes. Without the rewrite the QAT model keeps a fake-quant on
the conv output that the file does not carry: ``provenance`` names it and the twin is off (both checked).

Model: x -> conv -> BN "bn" -> Activation('relu') x3 ("r1", "r2", "r3") -> conv_1, conv_2, conv_3 -> Add -> GAP -> Dense
       and a ReLU(6) / ReLU pair on one tensor (not identical: both kept).
"""
import importlib

import numpy as np
import pytest

from mobileqat import export, lowering, provenance, transforms
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def stem_model():
    x = keras.Input((8, 8, 3))
    bn = L.BatchNormalization(name="bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x))
    branches = [L.Conv2D(4, 1, name=f"conv_{i}")(L.Activation("relu", name=f"r{i}")(bn)) for i in (1, 2, 3)]
    y = L.Add(name="add")([L.Add(name="add_a")(branches[:2]), branches[2]])
    z = L.Conv2D(4, 1, name="side")(x)
    capped = L.Add(name="add_capped")([L.ReLU(6.0, name="relu6_a")(z), L.ReLU(name="relu_b")(z)])
    y = L.Concatenate(name="cat")([y, capped])
    return keras.Model(x, L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="gap")(y)), name="stem_model")


def test_identical_activations_become_one_and_the_function_is_the_same():
    keras.utils.set_random_seed(0)
    model = stem_model()
    merged = transforms.merge_duplicate_activations(model)
    names = [layer.name for layer in merged.layers]
    assert "r1" in names and "r2" not in names and "r3" not in names
    assert "relu6_a" in names and "relu_b" in names  # ReLU(6) and ReLU: not the same function
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(merged(x)), np.asarray(model(x)))
    assert transforms.merge_duplicate_activations(merged) is merged  # nothing left to merge


def _exported(tmp_path, rewrites):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    qat = quantize(stem_model()) if rewrites is None else _quantize_with(rewrites)
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    qat.fit(x, rng.normal(size=(64, 3)).astype(np.float32), epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "stem.tflite")
    export.export_tflite(qat, path)
    codes = rng.integers(-128, 128, (32, 8, 8, 3)).astype(np.int8)
    return qat, path, codes


def _quantize_with(rewrites):
    q = importlib.import_module("mobileqat.quantize")
    saved = q.REWRITES
    q.REWRITES = rewrites
    try:
        return quantize(stem_model())
    finally:
        q.REWRITES = saved


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _exported(tmp_path_factory.mktemp("stem"), None)


def test_the_converter_fuses_the_one_relu_into_the_conv(exported):
    _, path, _ = exported
    ops = [o["op_name"] for o in TFLiteModel(path, "reference").interpreter._get_ops_details()]
    assert ops.count("RELU") == 1 and ops.count("RELU6") == 1, ops  # relu_b and relu6_a; r1-r3: fused into stem


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_twin_equals_the_file(exported, runtime):
    qat, path, codes = exported
    assert provenance.first_difference(lowering.lower(qat), path) is None
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime), TFLiteModel(path, runtime).invoke_raw(codes))


def test_without_the_rewrite_the_file_and_the_model_part_ways(tmp_path):
    q = importlib.import_module("mobileqat.quantize")
    without = tuple(r for r in q.REWRITES if r is not transforms.merge_duplicate_activations)
    qat, path, codes = _exported(tmp_path, without)
    assert "scale/zero point" in (provenance.first_difference(lowering.lower(qat), path) or "")
