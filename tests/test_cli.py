"""The mobileqat command end to end on tiny data: demo, run on an image folder, validate, bench."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TINY = ["--epochs", "1", "--qat-epochs", "1", "--alpha", "0.25", "--bench-runs", "5", "--quiet"]


def mobileqat(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "mobileqat.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)


def _filled(d, path=""):
    """Every leaf of the report.json contract is a measured value (no None)."""
    for k, v in d.items():
        if isinstance(v, dict):
            _filled(v, f"{path}{k}.")
        else:
            assert v is not None, f"{path}{k} is empty"


CONTRACT = {
    "dataset": ["name", "train", "test", "input_shape", "classes"],
    "model": ["name", "params"],
    "timings": ["float_step_s", "qat_step_s"],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = mobileqat("demo", "--out", out, "--train", 300, "--test", 100, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_demo_writes_full_report(demo):
    out, r = demo
    report = json.loads((out / "report.json").read_text())
    for key, fields in CONTRACT.items():
        assert all(f in report[key] for f in fields)
    v = report["variants"]
    for name in ("float", "ptq_int8", "qat_int8"):
        assert 0.0 <= v[name]["accuracy"] <= 1.0 and v[name]["tflite_bytes"] == (out / f"{name}.tflite").stat().st_size
        assert v[name]["latency_ms"]["xnnpack"] > 0
    q = v["qat_int8"]
    assert q["latency_ms"]["reference"] > 0 and 0 <= q["sim_accuracy"] <= 1
    for k in ("top1_agreement_reference", "top1_agreement_xnnpack", "frac_within_1lsb", "max_lsb_diff"):
        assert q["fidelity"][k] is not None
    _filled({k: report[k] for k in ("dataset", "model", "timings", "ratios")})
    assert report["accuracy_drop_points"]["qat_int8"] == pytest.approx(
        100 * (v["float"]["accuracy"] - q["accuracy"]))
    assert q["fidelity"]["xnnpack_twin_output_max_lsb_diff"] == 0  # the per-tensor XNNPACK column is exact
    assert report["dataset"]["test"] == 100 and report["errors"] == {}
    assert (out / "report.md").read_text().startswith("# mobileqat report")
    assert "top-1 agreement" in r.stdout
    assert not list(out.glob(".tmp-*"))
    _package_passes(out, 100, report)


def _package_passes(out, golden, report):
    """OUT/package: written at the end of the run, passes device-check, twin exact, the run's numbers inside."""
    from mobileqat import device_check
    manifest = json.loads((out / "package" / "manifest.json").read_text())
    assert manifest["golden"]["count"] == golden
    assert manifest["validation"]["test_set"]["accuracy_xnnpack"] == report["variants"]["qat_int8"]["accuracy"]
    for name in ("reference", "xnnpack"):
        assert manifest["validation"]["integer_twin"][name]["max_lsb_diff"] == 0
    assert device_check.check(out / "package", runs=0, log=lambda s: None)["passed"]


def test_validate_exit_code_follows_threshold(demo):
    out, _ = demo
    args = ["validate", out / "qat_int8.tflite", "--keras-model", out / "qat_model.h5", "--test", 50,
            "--runtimes", "reference"]
    ok = mobileqat(*args, "--min-agreement", 0.5)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "top1_agreement" in json.loads(ok.stdout)["runtimes"]["reference"]
    result = json.loads(ok.stdout)["runtimes"]["reference"]
    float_agreement = result["float_sim"]["top1_agreement"]
    if float_agreement < 1.0:
        bad = mobileqat(*args, "--simulation", "float", "--min-agreement", float_agreement + 1e-6)
        assert bad.returncode == 1 and "validation FAILED" in bad.stderr and "--min-agreement" in bad.stderr
    refused = mobileqat(*args, "--min-agreement", 1.01)  # not a fraction: a flag error, before any work
    assert refused.returncode == 2 and "--min-agreement" in refused.stderr and "<= 1.0" in refused.stderr
    worst = result["float_sim"]["max_lsb_diff"]
    assert worst > 0 and result["max_lsb_diff"] == 0  # the integer-exact path reproduces the file
    assert mobileqat(*args, "--max-lsb", 0).returncode == 0
    loose = mobileqat(*args, "--simulation", "float", "--max-lsb", worst)
    assert loose.returncode == 0, loose.stderr[-2000:]
    tight = mobileqat(*args, "--simulation", "float", "--max-lsb", worst - 1)
    assert tight.returncode == 1 and "float simulation" in tight.stderr and "--max-lsb" in tight.stderr


def test_bench_reports_latency_and_size(demo):
    out, _ = demo
    r = mobileqat("bench", out / "qat_int8.tflite", "--runs", 5, "--runtimes", "xnnpack", "reference")
    result = json.loads(r.stdout)
    assert result["latency_ms"]["xnnpack"] > 0 and result["latency_ms"]["reference"] > 0
    assert result["tflite_bytes"] == (out / "qat_int8.tflite").stat().st_size


def test_bench_compares_two_files_per_runtime_and_threads(demo, tmp_path):
    out, _ = demo
    a, b = out / "float.tflite", out / "qat_int8.tflite"
    r = mobileqat("bench", a, b, "--runs", 3, "--warmup", 1, "--threads", 1, 2, "--runtimes", "xnnpack", "reference",
                  "--json", tmp_path / "pair.json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "pair.json").read_text())
    assert [(row["runtime"], row["threads"]) for row in result["rows"]] == [
        ("xnnpack", 1), ("xnnpack", 2), ("reference", 1), ("reference", 2)]
    assert result["size_ratio"] == b.stat().st_size / a.stat().st_size
    assert all(row["a_ms"] > 0 and row["b_ms"] > 0 and row["ratio"] > 0 for row in result["rows"])
    assert "| reference | 2 |" in r.stdout and "B/A" in r.stdout
    three = mobileqat("bench", a, b, a)
    assert three.returncode == 2 and "two to compare" in three.stderr


def test_run_on_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "images"
    for c, colour in enumerate([(255, 40, 40), (40, 40, 255), (40, 255, 40)]):
        (data / f"class_{c}").mkdir(parents=True)
        for i in range(24):
            img = rng.integers(0, 60, (20, 28, 3), dtype=np.uint8)
            img[5:15, 6:20] = colour
            Image.fromarray(img).save(data / f"class_{c}" / f"{i}.png")
    (data / "class_0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = mobileqat("run", "--data", data, "--model", "mobilenet_v1", "--input-size", 32, "--io-type", "uint8",
                  "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["classes"] == 3 and report["model"]["name"] == "mobilenet_v1"
    assert report["variants"]["qat_int8"]["fidelity"]["max_lsb_diff"] is not None
    from mobileqat.export import tensor_types
    assert tensor_types(out / "qat_int8.tflite")["input"] == "uint8"
    assert "broken.png" in r.stderr
    _package_passes(out, report["dataset"]["test"], report)
    png = Image.open(out / "package" / "golden" / "images" / "0000.png")
    assert png.size == (28, 20)  # kept at its own size: device-check resizes it to 32 x 32


def test_bad_data_folder_is_a_clear_error(tmp_path):
    r = mobileqat("run", "--data", tmp_path / "missing", "--out", tmp_path / "o", *TINY)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "report.json").exists()
