"""``mobileqat run --scheme``: a mixed-precision rules file through the whole pipeline (report.json records
the rules and each layer's scheme, the file's weight grids, 0 LSB integer twin), and bad schemes stopping
the run before any training."""
import json

import numpy as np
from PIL import Image
from test_cli import TINY, mobileqat

RULES = {"default": "w4a8", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
                                      {"match": {"position": "last"}, "scheme": "w8a8"}]}


def _images(folder):
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(255, 40, 40), (40, 40, 255), (40, 255, 40)]):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(16):
            img = rng.integers(0, 60, (20, 28, 3), dtype=np.uint8)
            img[5:15, 6:20] = colour
            Image.fromarray(img).save(folder / f"class_{c}" / f"{i}.png")
    return folder


def test_run_with_a_rules_file_records_each_layers_scheme(tmp_path):
    data = _images(tmp_path / "images")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    out = tmp_path / "out"
    r = mobileqat("run", "--data", data, "--model", "mobilenet_v1", "--input-size", 32, "--scheme", rules,
                  "--out", out, *TINY)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "File \"/work/wt" in l or "Error" in l)[-6000:]
    report = json.loads((out / "report.json").read_text())
    q = report["variants"]["qat_int8"]
    assert q["scheme"]["given"] == {"file": str(rules), **RULES}
    layers = q["scheme"]["layers"]
    names = list(layers)
    assert layers[names[0]]["rule"] == 0 and layers[names[0]]["scheme"]["weight_bits"] == 8
    assert layers[names[-1]]["rule"] == 1 and layers[names[-1]]["class"] == "Dense"
    assert all(p["scheme"]["weight_bits"] == 4 and p["rule"] is None for p in list(layers.values())[1:-1])
    assert q["weights"]["grids"] == {"4-bit in int8": len(layers) - 2, "8-bit in int8": 2}
    assert report["variants"]["ptq_int8"]["weights"]["grids"] == {"8-bit in int8": len(layers)}
    assert 0 < q["weights"]["gzip_bytes"] < q["weights"]["bytes"] == q["tflite_bytes"]
    fid = q["fidelity"]
    assert fid["simulation"] == "integer" and fid["max_lsb_diff"] == 0 and fid["max_lsb_diff_xnnpack"] == 0
    assert report["config"]["scheme"] == q["scheme"]["given"]
    md = (out / "report.md").read_text()
    assert "4-bit in int8" in md and "| default |" in md


def test_bad_schemes_stop_the_run_before_training(tmp_path):
    data = _images(tmp_path / "images")
    r = mobileqat("run", "--data", data, "--scheme", "w3a8", "--out", tmp_path / "o1", *TINY)
    assert r.returncode == 2 and "unknown scheme 'w3a8'" in r.stderr and "Traceback" not in r.stderr
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"default": "w4a8", "rules": [{"match": {"name": "stem*"}, "scheme": "w8a8"}]}))
    r = mobileqat("run", "--data", data, "--model", "mobilenet_v1", "--scheme", rules, "--out", tmp_path / "o2", *TINY)
    assert r.returncode == 2 and "rule 0" in r.stderr and "matches no layer" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o2" / "checkpoints").exists()


def test_run_with_scheme_w8a16_writes_int16x8_files_and_package(tmp_path):
    """``--scheme w8a16``: the QAT file and its PTQ baseline (the converter's int16x8) take and give int16,
    the integer twin matches both runtimes at 0 LSB on the test split and op by op in the package, and the
    package passes device-check."""
    from mobileqat.runtime import TFLiteModel
    data = _images(tmp_path / "images")
    out = tmp_path / "out"
    r = mobileqat("run", "--data", data, "--model", "mobilenet_v1", "--input-size", 32, "--scheme", "w8a16",
                  "--golden", 4, "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    v = report["variants"]
    assert v["qat_int8"]["io_dtype"] == v["ptq_int8"]["io_dtype"] == "int16"
    for kind in ("ptq_int8", "qat_int8"):  # the interpreter's own view of each file
        m = TFLiteModel(str(out / f"{kind}.tflite"), "reference")
        assert m.input["dtype"] == m.output["dtype"] == np.int16
        assert v[kind]["accuracy"] is not None and v[kind]["accuracy_reference"] is not None
    fid = v["qat_int8"]["fidelity"]
    assert fid["simulation"] == "integer" and fid["max_lsb_diff"] == 0 and fid["max_lsb_diff_xnnpack"] == 0
    manifest = json.loads((out / "package" / "manifest.json").read_text())
    assert manifest["input"]["dtype"] == "int16"
    for runtime in ("reference", "xnnpack"):
        twin = manifest["validation"]["integer_twin"][runtime]
        assert twin["max_lsb_diff"] == 0 and twin["per_op"]["max_lsb_diff"] == 0
        assert twin["per_op"]["ops_compared"] == twin["per_op"]["of"] > 10
    check = mobileqat("device-check", out / "package")
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout[-2000:]


def test_w8a16_refuses_uint8_io_before_training(tmp_path):
    data = _images(tmp_path / "images")
    r = mobileqat("run", "--data", data, "--scheme", "w8a16", "--io-type", "uint8", "--out", tmp_path / "o", *TINY)
    assert r.returncode == 2 and "16-bit activations" in r.stderr and "int16" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
