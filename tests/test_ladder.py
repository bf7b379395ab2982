"""mobileqat auto (the PTQ-first ladder): stops at the first rung within the budget, climbs otherwise, resumes,
writes the chosen file and its report; numbers checked against the runtime and the files."""
import json
import os

import numpy as np
import pytest

from mobileqat import data, ladder, training
from mobileqat._tf import keras
from mobileqat.runtime import TFLiteModel

L = keras.layers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small float CNN trained on 16x16 shapes (4 classes), saved as a .keras file."""
    keras.utils.set_random_seed(0)
    ds = data.synthetic_shapes(n_train=384, n_test=96, image_size=16, seed=0)
    keep = ds.y_train < 4, ds.y_test < 4
    ds = data.Dataset("shapes4", ds.x_train[keep[0]], ds.y_train[keep[0]], ds.x_test[keep[1]], ds.y_test[keep[1]],
                      ds.class_names[:4])
    inp = keras.Input((16, 16, 3))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(y)))
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 1, use_bias=False)(y)))
    model = keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(y)))
    training.fit(model, ds.x_train, ds.y_train, epochs=4, batch_size=32, learning_rate=3e-3, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "float.keras")
    model.save(path)
    return ds, model, path


def _cfg(path, **kw):
    settings = dict(model_file=path, calibration_images=64, selection_images=64, twin_images=16, bench_runs=3,
                    adaround_iters=20, qat_epochs=1, verbose=0)
    return ladder.LadderConfig(**{**settings, **kw})


def _accuracy(path, ds):
    m = TFLiteModel(path, "xnnpack")
    return float(np.mean(m.predict(ds.x_test).argmax(-1) == ds.y_test))


def test_a_generous_budget_stops_at_the_first_rung(trained, tmp_path, capsys):
    ds, model, path = trained
    out = tmp_path / "auto"
    result = ladder.auto(ds, str(out), model, _cfg(path, budget=100.0))
    assert result["chosen"] == "ptq" and list(result["rungs"]) == ["ptq"]
    for name, entry in (("float", result["float"]), ("ptq", result["rungs"]["ptq"])):
        assert entry["accuracy"] == pytest.approx(_accuracy(str(out / f"{name}.tflite"), ds))  # from the file itself
        assert entry["bytes"] == os.path.getsize(out / f"{name}.tflite")
    ptq = result["rungs"]["ptq"]
    assert ptq["drop_points"] == pytest.approx(100 * (result["float"]["accuracy"] - ptq["accuracy"]), abs=1e-3)
    assert (out / "model.tflite").read_bytes() == (out / "ptq.tflite").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == "ptq" and report["meets_budget"]
    assert set(report["validation"]["runtimes"]) == {"reference", "xnnpack"}
    assert "| ptq |" in (out / "ladder.md").read_text()
    # a rerun with the same model, data and settings keeps what was measured: no new file is written
    before = (out / "ptq.tflite").stat().st_mtime_ns
    again = ladder.auto(ds, str(out), model, _cfg(path, budget=100.0, verbose=1))
    assert again["rungs"]["ptq"] == result["rungs"]["ptq"] and (out / "ptq.tflite").stat().st_mtime_ns == before
    assert "kept" in capsys.readouterr().out


def test_a_tight_budget_climbs_in_order_and_every_rung_is_measured(trained, tmp_path):
    """Budget 0 at W4A8: each rung tried failed the budget before the next was tried; mobileqat's files are at
    0 LSB from their integer twins; the mixed rung's rules are a file a user can read."""
    ds, model, path = trained
    out = tmp_path / "auto"
    result = ladder.auto(ds, str(out), model, _cfg(path, budget=0.0, scheme="w4a8"))
    names = list(result["rungs"])
    assert names == list(ladder.RUNGS[:len(names)])
    for name in names[:-1]:
        assert not result["rungs"][name]["meets_budget"]
    last = result["rungs"][names[-1]]
    assert (result["chosen"] == names[-1]) == bool(last["meets_budget"])
    for name in names:
        entry = result["rungs"][name]
        assert entry["accuracy"] == pytest.approx(_accuracy(str(out / f"{name}.tflite"), ds))
        assert (entry["twin"]["max_lsb_reference"], entry["twin"]["max_lsb_xnnpack"]) == (0, 0)
    calibration = result["rungs"]["calibration"]
    assert calibration["method"] in ("minmax", "percentile", "mse") and calibration["bias_correction"] in (False, True)
    assert len(calibration["selection_accuracy"]) == 2 * len(("minmax", "percentile", "mse"))  # each with and without
    if "mixed" in result["rungs"] and "skipped" not in result["rungs"]["mixed"]:
        from mobileqat.schemes import parse_rules
        parse_rules(json.loads((out / "plan.json").read_text()))
    assert (out / "model.tflite").exists() and (out / "report.json").exists()


@pytest.mark.parametrize("change,match", [({"budget": -1}, "budget=-1"), ({"scheme": "w8a16"}, "16-bit activations"),
                                          ({"methods": ("best",)}, "best")])
def test_bad_settings_are_named_before_any_work(trained, tmp_path, change, match):
    ds, model, path = trained
    with pytest.raises(ValueError, match=match):
        ladder.auto(ds, str(tmp_path / "auto"), model, _cfg(path, **change))
    assert not (tmp_path / "auto").exists()


def test_the_command_runs_on_an_image_folder_and_names_bad_flags(trained, tmp_path, capsys):
    from PIL import Image

    from mobileqat.cli import main
    ds, _, path = trained
    folder = tmp_path / "images"
    for i, (x, y) in enumerate(zip(ds.x_train[:160], ds.y_train[:160])):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round((x + 1) * 127.5).astype(np.uint8)).save(folder / str(y) / f"{i}.png")
    common = ["auto", "--model-file", path, "--data", str(folder), "--calibration-images", "32",
              "--selection-images", "32", "--twin-images", "8", "--bench-runs", "3", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "bad"), "--scheme", "w8a16"]) == 2
    assert "16-bit activations" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(common + ["--out", str(tmp_path / "out"), "--budget", "100"]) == 0
    printed = capsys.readouterr().out
    assert "| ptq |" in printed and "chosen: ptq" in printed
    assert (tmp_path / "out" / "model.tflite").read_bytes() == (tmp_path / "out" / "ptq.tflite").read_bytes()
