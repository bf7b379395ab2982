"""Exit codes and errors of every CLI command: unreadable or corrupt .tflite files, runtimes that all
fail, empty data sets, and numeric flags fuzzed with hypothesis (parsing only, no work started)."""
import contextlib
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from mobileqat import cli, harness, runtime as rt

TRIED = {"numeric flags": 0, "mutated .tflite": 0}


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "mobileqat.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def _one_error_line(r, *words):
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mobileqat: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_bench_and_validate_of_a_junk_file_exit_2_naming_it(tmp_path):
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00junk" * 50)
    for command in (["bench", junk], ["validate", junk, "--test", 4]):
        r = _cli(*command)
        assert r.returncode == 2
        _one_error_line(r, str(junk), "re-export")
        assert r.stdout == ""


def test_a_missing_file_exits_2_naming_it(tmp_path):
    r = _cli("bench", tmp_path / "nope.tflite")
    assert r.returncode == 2
    _one_error_line(r, "nope.tflite", "no such")


def test_bench_exits_1_when_every_runtime_fails(tiny_files, monkeypatch, capsys):
    monkeypatch.setattr(rt, "latency_isolated", lambda *a, **k: (None, "the runtime killed the process with SIGABRT"))
    assert cli.main(["bench", str(tiny_files / "a.tflite"), "--runtimes", "xnnpack", "reference"]) == 1
    err = capsys.readouterr().err
    assert "xnnpack: the runtime killed" in err and "reference: the runtime killed" in err


def test_validate_exits_1_when_every_runtime_fails(tiny_files, monkeypatch, capsys):
    monkeypatch.setattr(rt, "predict_isolated", lambda *a, **k: (None, "RuntimeError: failed to prepare"))
    code = cli.main(["validate", str(tiny_files / "a.tflite"), "--input-size", "12", "--test", "4"])
    assert code == 1 and "failed to prepare" in capsys.readouterr().err


def test_empty_test_split_exits_2_naming_the_data(tiny_files, tmp_path):
    data = tmp_path / "one_each"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        Image.fromarray(np.full((12, 12, 3), 40 * len(c), np.uint8)).save(data / c / "0.png")
    r = _cli("validate", tiny_files / "a.tflite", "--data", data, "--input-size", 12)
    assert r.returncode == 2
    _one_error_line(r, "no images", "test split is empty")
    out = tmp_path / "out"
    r = _cli("run", "--data", data, "--out", out, "--input-size", 12, "--quiet")
    assert r.returncode == 2
    _one_error_line(r, "one_each", "no test images")
    assert not out.exists()  # nothing half-made


def test_images_that_do_not_fit_the_model_exit_2(tiny_files):
    r = _cli("validate", tiny_files / "a.tflite", "--input-size", 16, "--test", 4)
    assert r.returncode == 2
    _one_error_line(r, "[16, 16, 3]", "[12, 12, 3]", "--input-size")


FLAGS = {  # command prefix, flag, (kind, low, high)
    "--threads": (["export", "m.h5", "--out", "p"], int, 1, 256),
    "--warmup": (["bench", "m.tflite"], int, 0, None),
    "--runs": (["bench", "m.tflite"], int, 1, None),
    "--test": (["validate", "m.tflite"], int, 1, None),
    "--input-size": (["validate", "m.tflite"], int, 8, 2048),
    "--min-agreement": (["validate", "m.tflite"], float, 0.0, 1.0),
    "--max-lsb": (["validate", "m.tflite"], int, 0, None),
    "--samples": (["debug", "m.tflite", "--keras-model", "m.h5"], int, 1, None),
    "--seed": (["validate", "m.tflite"], int, 0, 2**32 - 1),
    "--epochs": (["demo", "--out", "o"], int, 1, None),
    "--qat-epochs": (["demo", "--out", "o"], int, 1, None),
    "--batch-size": (["demo", "--out", "o"], int, 1, None),
    "--train": (["demo", "--out", "o"], int, 1, None),
    "--bench-runs": (["demo", "--out", "o"], int, 1, None),
    "--learning-rate": (["demo", "--out", "o"], float, 1e-12, 10.0),
    "--qat-learning-rate": (["run", "--data", "d", "--out", "o"], float, 1e-12, 10.0),
    "--alpha": (["run", "--data", "d", "--out", "o"], float, 1e-3, 10.0),
    "--difficulty": (["demo", "--out", "o"], float, 0.0, 100.0),
}

numbers_as_text = st.one_of(
    st.text(max_size=12), st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1_000", " 3 ", "", "-0", "0.0", "1e-13", "٣"]))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(sorted(FLAGS)), text=numbers_as_text)
def test_numeric_flags_parse_into_range_or_exit_2_naming_the_flag(flag, text):
    TRIED["numeric flags"] += 1
    prefix, kind, low, high = FLAGS[flag]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = cli.build_parser().parse_args(prefix + [f"{flag}={text}"])
    except SystemExit as e:
        message = stderr.getvalue().strip().splitlines()[-1]
        assert e.code == 2 and f"argument {flag}:" in message, message
        return
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    assert isinstance(value, kind) and (kind is int or math.isfinite(value))
    assert (low is None or value >= low) and (high is None or value <= high)


def _mutate(data, draw_ops):
    data = bytearray(data)
    for op, at, value in draw_ops:
        at %= max(len(data), 1)
        if op == "set":
            data[at] = value
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = bytes([value]) * 8
        if not data:
            break
    return bytes(data)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                      HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["set", "set", "set", "truncate", "insert"]),
                              st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_flatbuffers_give_an_error_or_a_result_never_a_crash(tiny_files, tmp_path_factory, ops):
    TRIED["mutated .tflite"] += 1
    path = tmp_path_factory.mktemp("mutant") / "m.tflite"
    path.write_bytes(_mutate((tiny_files / "a.tflite").read_bytes(), ops))
    x = np.load(tiny_files / "x.npy")[:4]
    try:
        result = harness.validate(path, x, runtimes=("reference", "xnnpack"))
    except ValueError as e:  # InvalidModelError, images that do not fit, damaged metadata: all name the file
        assert str(path) in str(e) or "tflite" in str(e), e
        return
    for name, r in result["runtimes"].items():
        assert "error" in r or r.get("accuracy") is None  # ran, or reported the runtime's failure


def teardown_module():
    print(f"\ninputs tried: {TRIED}", file=sys.__stderr__)


def test_debug_exits_1_when_the_reference_kernels_cannot_run_the_file(tiny_files, monkeypatch, capsys):
    real = rt.run_isolated

    def reference_aborts(fn, *args, **kwargs):
        if fn.__name__ == "tflite_activations":
            return None, "the runtime killed the process with SIGABRT (a kernel aborted, e.g. in Prepare)"
        return real(fn, *args, **kwargs)
    monkeypatch.setattr(rt, "run_isolated", reference_aborts)
    code = cli.main(["debug", str(tiny_files / "a.tflite"), "--keras-model", str(tiny_files / "a.h5"),
                     "--input-size", "12", "--test", "4", "--samples", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "reference kernels could not run" in err and "SIGABRT" in err


def test_a_run_whose_files_no_runtime_can_run_exits_1(capsys):
    report = {"dataset": {"name": "d", "test": 1}, "model": {"name": "m", "params": 1},
              "variants": {"float": {"accuracy": 0.9}, "qat_int8": {"accuracy": None, "accuracy_reference": None}},
              "errors": {"qat_int8/xnnpack": "SIGABRT", "qat_int8/reference": "SIGABRT"}}
    assert cli._finish(report, "out") == 1
    assert "no runtime ran qat_int8" in capsys.readouterr().err
    report["variants"]["qat_int8"]["accuracy_reference"] = 0.8  # one runtime ran it: the run did its job
    assert cli._finish(report, "out") == 0
