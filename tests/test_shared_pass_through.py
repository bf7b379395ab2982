"""A pass-through output (pooling, padding) that two same-scale joins (Concatenate, Maximum, Minimum)
read. TF 2.21's converter cannot give it the two joins' scales ("quantization parameters violate the same
scale constraint"), so ``quantize`` lets its other readers read it through a fixed identity 1x1 depthwise
scale with a range of its own (``transforms.requantize_shared_pass_through``). The twin reproduces the
file at 0 LSB on both runtimes.

Model (one export):
  x -> conv_a (linear) -> MaxPooling2D 2/1 same "pool" -> Concatenate with conv_b, Concatenate with conv_c
  x -> conv_d (linear) -> ZeroPadding2D 1 "pad" -> MaxPooling2D 3/1 valid "pool2" -> Dropout "drop"
       -> Maximum with conv_e, Minimum with conv_f
"""
import numpy as np
import pytest

from mobileqat import export, lowering, provenance, transforms
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel

L = keras.layers


def shared_model():
    x = keras.Input((8, 8, 3))
    conv = lambda name: L.Conv2D(4, 3, padding="same", name=name)(x)  # noqa: E731
    pool = L.MaxPooling2D(2, strides=1, padding="same", name="pool")(conv("conv_a"))
    j1 = L.Concatenate(name="cat1")([pool, conv("conv_b")])
    j2 = L.Concatenate(name="cat2")([conv("conv_c"), pool])
    drop = L.Dropout(0.1, name="drop")(L.MaxPooling2D(3, strides=1, name="pool2")(
        L.ZeroPadding2D(1, name="pad")(conv("conv_d"))))
    j3 = L.Maximum(name="max")([drop, conv("conv_e")])
    j4 = L.Minimum(name="min")([conv("conv_f"), drop])
    y = L.Concatenate(name="cat_all")([L.Add(name="add")([j1, j2]), j3, j4])
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(x, L.Dense(3, name="fc")(y), name="shared")


def test_the_layers_two_joins_reach_are_found():
    assert transforms.shared_pass_through(shared_model()) == {"pool", "pad", "pool2", "drop"}


def test_the_other_readers_read_a_fixed_identity_scale():
    keras.utils.set_random_seed(0)
    model = shared_model()
    rewritten = transforms.requantize_shared_pass_through(model)
    names = [layer.name for layer in rewritten.layers]
    # the last shared layer of each chain: "pool", and "drop" (Dropout writes no op: its producer's tensor)
    assert [n for n in names if n.endswith("_requantize")] == ["pool_requantize", "drop_requantize"]
    assert transforms.shared_pass_through(rewritten) == set()
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rewritten(x)), np.asarray(model(x)))


def test_a_single_join_changes_nothing():
    x = keras.Input((8, 8, 3))
    pool = L.MaxPooling2D(2, strides=1, padding="same")(L.Conv2D(4, 3, padding="same")(x))
    model = keras.Model(x, L.Concatenate()([pool, L.Conv2D(4, 3, padding="same")(x)]))
    assert transforms.requantize_shared_pass_through(model) is model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    qat = quantize(shared_model())
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    qat.fit(x, rng.normal(size=(64, 3)).astype(np.float32), epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path_factory.mktemp("shared") / "shared.tflite")
    export.export_tflite(qat, path)
    codes = np.concatenate([rng.integers(-128, 128, (48, 8, 8, 3)),
                            np.full((1, 8, 8, 3), -128), np.full((1, 8, 8, 3), 127)]).astype(np.int8)
    return qat, path, codes


def test_the_file_keeps_one_op_per_layer(exported):
    _, path, _ = exported
    ops = [o["op_name"] for o in TFLiteModel(path, "reference").interpreter._get_ops_details()]
    assert ops.count("MAX_POOL_2D") == 2 and ops.count("PAD") == 1, ops
    assert ops.count("DEPTHWISE_CONV_2D") == 2, ops  # the two identity scales


def test_the_identity_scales_have_ranges_of_their_own(exported):
    """Not a degenerate case: each join requantizes the shared output or the scale beside it."""
    qat, _, _ = exported
    integer_model = lowering.lower(qat)
    assert sum(op.kind == "requantize" for op in integer_model.ops) >= 2


@pytest.mark.parametrize("runtime", ["reference", "xnnpack"])
def test_twin_equals_the_file(exported, runtime):
    qat, path, codes = exported
    np.testing.assert_array_equal(lowering.lower(qat).run(codes, runtime),
                                  TFLiteModel(path, runtime).invoke_raw(codes))


def test_provenance_finds_no_difference(exported):
    qat, path, _ = exported
    assert provenance.first_difference(lowering.lower(qat), path) is None
