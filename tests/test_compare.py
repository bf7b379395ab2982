"""`mobileqat compare`: every variant's file measured (accuracy on XNNPACK, bytes, gzip bytes, twin) and checked
here against independent measurements of the same files; a rerun skips the variants already measured; a bad
variant name is refused before any work."""
import gzip
import json
import os

import numpy as np
import pytest

from conftest import user_cnn_files
from mobileqat import cli
from mobileqat.compare import CompareConfig, check_variants, compare

VARIANTS = ("float", "ptq_w8a8", "qat_w4a8")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """3 classes x 16 images (a coloured block on noise) and a small CNN (Conv2D+BN+ReLU, DepthwiseConv2D+BN+ReLU6,
    Add, GAP, Dense, softmax) on 16x20x3 inputs scaled to 0..1, trained a few epochs, saved as .keras."""
    return user_cnn_files(tmp_path_factory.mktemp("compare"))


def _compare(user, out, variants):
    from mobileqat.data import image_folder_stream
    from mobileqat.pipeline import load_model_file
    model, _ = load_model_file(user / "user.keras")
    ds = image_folder_stream(user / "data", (16, 20), 3, pixels="0..1")
    cfg = CompareConfig(model=None, alpha=None, model_file=str(user / "user.keras"), variants=variants,
                        qat_epochs=1, batch_size=16, freeze_bn=1, bench_runs=5, twin_images=9,
                        calibration_images=16, verbose=0)
    return compare(ds, out, cfg, float_model=model), ds


def test_compare_measures_each_file_and_a_rerun_skips_finished_variants(user, tmp_path):
    from mobileqat.runtime import TFLiteModel
    out = tmp_path / "out"
    result, ds = _compare(user, out, VARIANTS)
    assert list(result["variants"]) == list(VARIANTS)
    x, y = ds.arrays("test")
    assert len(y) == 9
    for name, v in result["variants"].items():
        path = out / f"{name}.tflite"
        data = path.read_bytes()
        # accuracy recomputed from the file on XNNPACK, bytes and gzip bytes from the file
        probs = TFLiteModel(str(path), "xnnpack").predict(x)
        assert v["accuracy"] == pytest.approx(float(np.mean(probs.argmax(-1) == y)))
        assert v["bytes"] == len(data) and v["gzip_bytes"] == len(gzip.compress(data, 9, mtime=0))
        assert v["latency_ms"] > 0 and "errors" not in v
    assert result["variants"]["float"]["grids"] == {"float32": 4} and "twin" not in result["variants"]["ptq_w8a8"]
    qat = result["variants"]["qat_w4a8"]
    assert qat["twin"] == {"images": 9, "max_lsb_reference": 0, "max_lsb_xnnpack": 0}
    assert qat["grids"] == {"4-bit in int8": 3, "int4 packed": 1}  # 3 convs on the 4-bit grid, the Dense packed
    t = qat["train"]
    assert t["step_vs_float"] == pytest.approx(t["before_freeze_step_s"] / result["float_step_s"])
    assert t["after_freeze_step_s"] > 0 and len(t["loss"]) == 1
    assert t["paired"]["frozen"] is True and t["paired"]["rounds"] == 10 and t["paired"]["ratio"] > 0
    md = (out / "compare.md").read_text()
    for name in VARIANTS:
        assert f"| {name} (" in md
    assert "## Issue 13 goals" in md and json.loads((out / "compare.json").read_text())["variants"] == json.loads(
        json.dumps(result["variants"]))

    # rerun with one more variant: the three measured are kept as they were (files untouched), one is added
    mtimes = {n: os.stat(out / f"{n}.tflite").st_mtime_ns for n in VARIANTS}
    again, _ = _compare(user, out, ("ptq_w4a8",) + VARIANTS)
    assert list(again["variants"]) == ["ptq_w4a8", *VARIANTS]
    assert {n: os.stat(out / f"{n}.tflite").st_mtime_ns for n in VARIANTS} == mtimes
    for name in VARIANTS:
        assert again["variants"][name] == json.loads(json.dumps(result["variants"][name]))
    p = again["variants"]["ptq_w4a8"]
    assert p["twin"]["max_lsb_reference"] == 0 and p["twin"]["max_lsb_xnnpack"] == 0
    assert p["grids"] == {"4-bit in int8": 3, "int4 packed": 1}


def test_bad_variant_names_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown variant 'qat_w3a8'; choose from: float, ptq_w8a8"):
        check_variants(["float", "qat_w3a8"])
    assert check_variants(["float", " qat_w8a8", "float"]) == ("float", "qat_w8a8")
    assert cli.main(["compare", "--out", str(tmp_path / "o"), "--variants", "float,lsq"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'lsq'" in err and "qat_w4a8_lsq" in err
    assert not (tmp_path / "o").exists()


def test_goals_follow_issue_13():
    from mobileqat.compare import goals
    v = {"float": {"accuracy": 0.90}, "ptq_w4a8": {"accuracy": 0.80}, "qat_w8a8": {"accuracy": 0.899},
         "qat_w4a8": {"accuracy": 0.87, "train": {"after_freeze_step_vs_float": 1.1}},
         "qat_w4a8_lsq": {"accuracy": 0.89, "train": {"after_freeze_step_vs_float": 1.3}}}
    g = goals({"variants": v})
    assert g["qat_w8a8_within_0.2_points_of_float"]["met"] is True
    assert g["qat_w4a8_within_1.5_points_of_float"] == {"variant": "qat_w4a8_lsq", "value": 1.0, "target": "<= 1.5",
                                                        "met": True}
    assert g["qat_w4a8_2_points_above_ptq_w4a8"]["value"] == 9.0 and g["qat_w4a8_2_points_above_ptq_w4a8"]["met"]
    assert g["qat_step_after_bn_freeze_within_1.25x_float"]["variant"] == "qat_w4a8_lsq"
    assert g["qat_step_after_bn_freeze_within_1.25x_float"]["met"] is False
    v["ptq_w4a8"]["accuracy"] = 0.88  # PTQ loses 2 points: QAT must recover two-thirds of them
    assert goals({"variants": v})["qat_w4a8_recovers_2_3_of_ptq_loss"]["value"] == 0.5
