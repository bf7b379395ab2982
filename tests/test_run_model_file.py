"""`mobileqat run --model-file`: QAT fine-tuning of the user's trained float model (.keras and .h5) on a
streamed image folder; report.json with float / ptq_int8 / qat_int8; resumable; bad files exit 2."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import user_cnn_files
from mobileqat import cli

RUN = ["--pixels", "0..1", "--qat-epochs", 1, "--batch-size", 16, "--bench-runs", 3]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A folder of 3 classes x 16 images (a coloured block on noise, PNG and JPEG) and a small functional
    CNN (Conv2D+BN+ReLU, DepthwiseConv2D+BN+ReLU6, Add, GAP, Dense, softmax) on 16x20 inputs scaled to 0..1,
    trained a few epochs and saved as .keras and .h5."""
    return user_cnn_files(tmp_path_factory.mktemp("user"), jpeg_every_other=True)


def _cli(*args, kill_at=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("MOBILEQAT_KILL_AT", None)
    if kill_at:
        env["MOBILEQAT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "mobileqat.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def _check_report(out, model_file):
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["float", "ptq_int8", "qat_int8"]
    for name, v in report["variants"].items():
        assert 0.0 <= v["accuracy"] <= 1.0 and v["tflite_bytes"] == (out / f"{name}.tflite").stat().st_size
    fid = report["variants"]["qat_int8"]["fidelity"]
    assert fid["max_lsb_diff"] == 0 and fid["max_lsb_diff_xnnpack"] == 0  # the twin still reproduces the file
    m = report["model"]
    assert m["source"] == "model_file" and m["file"] == str(model_file) and m["output"] == "probabilities"
    assert report["dataset"] == {"name": "data", "train": 39, "test": 9, "input_shape": [16, 20, 3], "classes": 3,
                                 "pixels": "0..1", "skipped": 0, "streamed": True}
    assert report["training"]["float"] is None and len(report["training"]["qat"]["loss"]) == 1  # no float training
    assert report["timings"]["float_step_s"] is None and report["timings"]["qat_step_s"] > 0
    assert report["errors"] == {} and not (out / "float_model.keras").exists()
    assert "not trained here" in (out / "report.md").read_text()
    return report


def test_run_model_file_keras_writes_the_three_variants(user, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--model-file", str(user / "user.keras"), "--data", str(user / "data"), "--out", str(out),
                     *map(str, RUN), "--quiet"]) == 0, capsys.readouterr().err[-3000:]
    report = _check_report(out, user / "user.keras")
    assert report["config"]["model_file"] == str(user / "user.keras") and report["config"]["epochs"] is None


def test_run_model_file_h5_killed_during_qat_resumes(user, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(a) for a in ["run", "--model-file", user / "user.h5", "--data", user / "data", "--out", out, *RUN]]
    r = _cli(*args, kill_at="train_step:2")  # SIGKILL during the QAT fine-tune, after the float/PTQ export
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "not trained again" in r.stdout and not (out / "report.json").exists()
    assert cli.main(args) == 0, capsys.readouterr().err[-3000:]  # the same command again
    assert "export: float and PTQ int8: written earlier" in capsys.readouterr().out  # resumed, not redone
    _check_report(out, user / "user.h5")


def test_bad_model_files_exit_2_with_one_line_naming_the_file(user, tmp_path, capsys):
    from mobileqat._tf import keras
    L = keras.layers
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"PK not a model")
    inp = keras.Input((16, 20, 3))
    refused = tmp_path / "refused.h5"
    keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(L.Conv1D(4, 3, dilation_rate=2)(L.Reshape((16 * 20, 3))(inp))))).save(refused)
    five = tmp_path / "five.keras"
    keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inp)))).save(five)
    cases = [(junk, [], ["cannot be loaded", "model.save('model.keras')"]),
             (tmp_path / "missing.h5", [], ["does not exist", "model.save"]),
             (refused, [], ["cannot quantize", "Conv1D", "fix:"]),
             (five, [], ["5 output classes", "3 class sub-folders", "fix:"]),
             (user / "user.keras", ["--epochs", "2"], ["--epochs with --model-file", "drop it"]),
             (user / "user.keras", ["--pixels", "mean_std"], ["needs mean and std"])]
    for path, extra, words in cases:
        out = tmp_path / f"out_{path.name}"
        code = cli.main(["run", "--model-file", str(path), "--data", str(user / "data"), "--out", str(out), "--quiet",
                         *extra])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("mobileqat: error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert (str(path) in lines[0] or not words[0].startswith("model")) and all(w in err for w in words), err
        assert not out.exists()  # refused before any work


def test_chunked_validation_merges_to_the_whole_set_numbers(rng):
    """The harness runs on test chunks of a streamed folder; merging chunk results gives the whole set's."""
    from mobileqat.harness import compare_codes
    from mobileqat.pipeline import merge_validations
    a, b = rng.integers(-128, 128, (50, 4)), rng.integers(-128, 128, (50, 4))
    b[::3] = a[::3]
    y = rng.integers(0, 4, 50)
    cuts = [(0, 7), (7, 30), (30, 50)]

    def result(lo, hi):
        acc = float(np.mean(b[lo:hi].argmax(-1) == y[lo:hi]))
        return {"tflite_bytes": 123, "provenance": {"check": "fingerprint"}, "sim_accuracy": acc,
                "integer_accuracy": {"reference": acc},
                "runtimes": {"reference": {"accuracy": acc, "simulation": "integer",
                                           **compare_codes(a[lo:hi], b[lo:hi])},
                             "xnnpack": {"error": "SIGABRT"} if lo == 7 else {"accuracy": acc}}}
    merged = merge_validations([result(lo, hi) for lo, hi in cuts], [hi - lo for lo, hi in cuts])
    whole = result(0, 50)
    ref = merged["runtimes"]["reference"]
    for k, v in whole["runtimes"]["reference"].items():
        assert ref[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    assert merged["sim_accuracy"] == pytest.approx(whole["sim_accuracy"])
    assert merged["runtimes"]["xnnpack"] == {"error": "SIGABRT"}  # failed on one chunk: failed
    assert merged["tflite_bytes"] == 123 and merged["provenance"] == {"check": "fingerprint"}


def test_cache_folder_keeps_only_this_datas_complete_cache(tmp_path):
    from mobileqat.pipeline import _cache_prefix
    cache = tmp_path / "cache"
    cache.mkdir()
    keep = ["train-0123456789abcdef.index", "train-0123456789abcdef.data-00000-of-00001"]
    gone = ["train-0123456789abcdef_0.lockfile", "train-0123456789abcdef_0.data-00000-of-00001.tempstate42",
            "train-fedcba9876543210.index"]  # a killed run's lock and partial write; another data set's cache
    for name in keep + gone:
        (cache / name).write_bytes(b"x")
    assert _cache_prefix(str(tmp_path), "0123456789abcdef" + "0" * 16) == str(cache / "train-0123456789abcdef")
    assert sorted(os.listdir(cache)) == sorted(keep)
