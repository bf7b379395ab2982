"""Files that do not belong together: the fingerprint in the .tflite metadata, the integer twin's
op-by-op check, and what validate / debug / the CLI do with a file from another model."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mobileqat import debug, export, harness, provenance, tflite_file
from mobileqat.quantize import load_qat_model
from mobileqat.runtime import TFLiteModel


@pytest.fixture(scope="module")
def models(tiny_files):
    return {k: load_qat_model(tiny_files / f"{k}.h5") for k in "abc"}


def test_export_writes_the_models_fingerprint_and_the_file_runs_as_without_it(tiny_files, models, tmp_path):
    record = provenance.read_record(tiny_files / "a.tflite")
    assert record["fingerprint"] == provenance.fingerprint(models["a"]) and record["kind"] == "qat_int8"
    assert provenance.fingerprint(models["b"]) != record["fingerprint"]
    bare = tmp_path / "bare.tflite"  # the converter's bytes, no metadata
    bare.write_bytes(export.convert(models["a"], "qat_int8"))
    assert tflite_file.read_metadata(bare).get(provenance.METADATA_NAME) is None
    x = np.load(tiny_files / "x.npy")
    for runtime in ("reference", "xnnpack"):
        np.testing.assert_array_equal(TFLiteModel(tiny_files / "a.tflite", runtime).predict(x),
                                      TFLiteModel(bare, runtime).predict(x))


def test_metadata_round_trips_and_replaces_an_entry_of_the_same_name(tiny_files):
    data = (tiny_files / "a.tflite").read_bytes()
    once = tflite_file.with_metadata(data, {"x": b"1", "y": b"\x00\xff"})
    twice = tflite_file.with_metadata(once, {"x": b"22"})
    meta = tflite_file.read_metadata(twice)
    assert meta["x"] == b"22" and meta["y"] == b"\x00\xff" and provenance.METADATA_NAME in meta
    with pytest.raises(ValueError, match="not a .tflite"):
        tflite_file.read_metadata(b"junk" * 10)


def test_the_fingerprint_survives_saving_and_matches_cheaply(tiny_files, models):
    assert provenance.check(models["a"], tiny_files / "a.tflite")["check"] == "fingerprint"


def test_another_models_file_is_refused_naming_the_first_differing_tensor(tiny_files, models):
    with pytest.raises(provenance.FileMismatchError) as e:
        harness.validate(tiny_files / "a.tflite", np.load(tiny_files / "x.npy"), model=models["b"])
    message = str(e.value)
    assert "\n" not in message and "was not exported from model" in message and "a.tflite" in message
    # The first op whose parameters differ is the stem conv: its output range or weights differ.
    assert "stem" in message and "re-export" in message


def test_a_file_without_fingerprint_is_checked_by_the_integer_twin(tiny_files, models, tmp_path):
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(export.convert(models["a"], "qat_int8"))
    assert provenance.check(models["a"], bare)["check"] == "integer_twin"
    with pytest.raises(provenance.FileMismatchError, match="stem"):
        provenance.check(models["b"], bare)
    with pytest.raises(provenance.FileMismatchError):
        provenance.check(models["c"], bare)  # one conv more


def test_the_twin_names_where_the_op_sequences_part(tiny_files, models):
    from mobileqat.lowering import lower
    twin = lower(models["a"])
    twin.ops.insert(1, dataclasses.replace(twin.ops[0]))  # a second conv where the file pools
    why = provenance.first_difference(twin, tiny_files / "a.tflite")
    assert why.startswith("op 1: the file has MEAN where the model has CONV_2D")
    twin.ops = twin.ops[:1]
    assert "the file has MEAN where the other has none" in provenance.first_difference(twin, tiny_files / "a.tflite")


def test_the_twin_names_a_weight_that_differs(tiny_files, models, tmp_path):
    from mobileqat import lowering
    integer_model = lowering.lower(models["a"])
    conv = integer_model.ops[0]
    conv.params["weights"] = conv.params["weights"].copy()
    conv.params["weights"].flat[5] ^= 1  # one int8 code off by one bit
    why = provenance.first_difference(integer_model, tiny_files / "a.tflite")
    assert "weights of layer" in why and "1 of" in why


def test_a_model_trained_further_no_longer_owns_the_file(tiny_files, tmp_path):
    from conftest import tiny_data
    qat = load_qat_model(tiny_files / "a.h5")
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(*tiny_data(), epochs=1, verbose=0)
    with pytest.raises(provenance.FileMismatchError):
        provenance.check(qat, tiny_files / "a.tflite")


def test_debug_refuses_another_models_file(tiny_files, models):
    with pytest.raises(provenance.FileMismatchError):
        debug.debug_fidelity(models["b"], tiny_files / "a.tflite", np.load(tiny_files / "x.npy"))


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "mobileqat.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_cli_validate_and_debug_exit_nonzero_on_a_foreign_file(tiny_files):
    for command in (["validate", tiny_files / "a.tflite", "--keras-model", tiny_files / "b.h5"],
                    ["debug", tiny_files / "a.tflite", "--keras-model", tiny_files / "b.h5"]):
        r = _cli(*command, "--input-size", 12, "--test", 8)
        assert r.returncode == 2, (command, r.stderr[-2000:])
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mobileqat: error:")]
        assert len(errors) == 1 and "was not exported from model" in errors[0] and "Traceback" not in r.stderr
        assert "top1_agreement" not in r.stdout and "max LSB" not in r.stdout  # no meaningless numbers


def test_cli_validate_accepts_the_models_own_file(tiny_files):
    r = _cli("validate", tiny_files / "a.tflite", "--keras-model", tiny_files / "a.h5", "--input-size", 12,
             "--test", 8, "--max-lsb", 0, "--min-agreement", 1.0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["provenance"]["check"] == "fingerprint"


def test_a_pad_the_converter_folds_into_the_next_conv_is_no_difference(tmp_path):
    """ZeroPadding2D((0, 1), (0, 1)) + stride-2 'valid' DepthwiseConv2D on 16x16 is the conv's SAME padding: the
    converter writes no PAD and the DEPTHWISE_CONV_2D reads the padding's input. The twin keeps its pad op;
    ``first_difference`` must not report it, and still reports a weight changed after that conv."""
    from mobileqat import lowering
    from mobileqat._tf import keras
    from mobileqat.quantize import quantize
    L = keras.layers
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)))
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False,
                                                              name="dw")(x)))
    x = L.Dense(4, name="fc")(L.GlobalAveragePooling2D()(x))
    qat = quantize(keras.Model(inp, x, name="padded"), "w8a8")
    qat(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32), training=True)
    path = str(tmp_path / "padded.tflite")
    export.export_tflite(qat, path)
    ops = [op["op_name"] for op in TFLiteModel(path, "reference").interpreter._get_ops_details()]
    assert "PAD" not in ops and "DEPTHWISE_CONV_2D" in ops, ops  # the converter's fold this test is about
    twin = lowering.lower(qat)
    assert "pad" in [op.kind for op in twin.ops]
    assert provenance.first_difference(twin, path) is None
    kernel = next(v for v in qat.get_layer("quant_fc").weights if v.name.endswith("kernel:0"))
    kernel.assign(kernel.numpy() * 1.5)
    assert "fc" in (provenance.first_difference(lowering.lower(qat), path) or "")
