"""``mobileqat.sensitivity`` and ``mobileqat sensitivity``: every per-layer number recomputed independently
(ptq with a hand-written single-layer rule, the integer twin run here, numpy accuracy and code change), the
plan's rules parsed and re-measured against the budget, the greedy choice and the back-off on made-up
sensitivities, the plan's .tflite against the twin, the plot, and the errors."""
import json

import numpy as np
import pytest
from PIL import Image

import mobileqat as mq
from mobileqat import cli
from mobileqat import sensitivity as S
from mobileqat._tf import keras
from mobileqat.calibration import ptq
from mobileqat.lowering import lower
from mobileqat.schemes import load_rules, parse_rules

L = keras.layers
LOW = {"weight_bits": 2}  # 2-bit weights hurt this tiny net visibly; 3- and 4-bit ones did not
CLASSES = 4


def _folder(root, n=64):
    """CLASSES classes of 16x16 RGB images: noise plus a square of class k's colour somewhere."""
    rng = np.random.default_rng(0)
    colours = np.array([(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)])
    for k in range(CLASSES):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
            r, c = rng.integers(0, 11, 2)
            img[r:r + 5, c:c + 5] = np.clip(colours[k] + rng.integers(-25, 26, 3), 0, 255)
            Image.fromarray(img).save(root / f"class_{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sens")
    folder = _folder(root / "images")
    stream = mq.image_folder_stream(folder, 16, 3, seed=0)
    x_train, y_train = stream.arrays("train")
    x, y = stream.arrays("test")
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    h = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                                                    name="stem")(inp)))
    h = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(h)))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(12, 1, use_bias=False, name="pw")(h)))
    out = L.Dense(CLASSES, activation="softmax", name="head")(L.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out, name="sens_net")
    mq.fit(model, x_train, y_train, epochs=20, batch_size=16, learning_rate=1e-2, verbose=0)
    model.save(root / "model.keras")
    calib = mq.calibration_subset(stream, 32)
    run = S.SensitivityRun(model, calib, x, y, "w8a8", LOW)
    return dict(root=root, folder=folder, model=model, calib=calib, x=x, y=y, run=run,
                sens=S.layer_sensitivity(run))


def _twin_codes(qat, x):
    twin = lower(qat)
    return twin.run(twin.quantize_input(x), "xnnpack").astype(np.int32)


def test_each_layers_numbers_equal_an_independent_recomputation(setup):
    model, calib, x, y, sens = (setup[k] for k in ("model", "calib", "x", "y", "sens"))
    assert setup["run"].fast  # same activations, min-max: the calibration is reused
    base = _twin_codes(ptq(model, calib, "w8a8"), x)
    base_acc = np.mean(base.argmax(-1) == y)
    assert sens["baseline"]["accuracy"] == pytest.approx(base_acc) and base_acc > 0.8
    assert [r["name"] for r in sens["layers"]] == ["stem", "dw", "pw", "head"]
    for row in sens["layers"]:
        rules = parse_rules({"default": "w8a8", "rules": [{"match": {"name": row["name"]}, "scheme": LOW}]})
        codes = _twin_codes(ptq(model, calib, rules), x)
        acc = np.mean(codes.argmax(-1) == y)
        assert row["accuracy"] == pytest.approx(acc), row
        assert row["drop_points"] == pytest.approx(100 * (base_acc - acc)), row
        assert row["mean_abs_code_change"] == pytest.approx(np.abs(codes - base).mean()), row
        assert row["top1_changed"] == pytest.approx(np.mean(codes.argmax(-1) != base.argmax(-1))), row
        weights = model.get_layer(row["name"]).weights[0].shape.num_elements()  # kernel or depthwise_kernel
        assert row["weights"] == weights and row["bytes_saved"] == weights * (8 - 2) // 8
        assert row["file_bytes_saved"] == 0  # 2-bit weights are int8 tensors in the file
    assert max(r["drop_points"] for r in sens["layers"]) > 0  # something to plan around


def test_plan_rules_parse_and_meet_the_budget_when_measured_again(setup):
    model, calib, x, y, sens, run = (setup[k] for k in ("model", "calib", "x", "y", "sens", "run"))
    base_acc = sens["baseline"]["accuracy"]
    everything = S.mixed_precision_plan(sens, 100.0, run)
    assert everything["low_layers"] == ["stem", "dw", "pw", "head"] and not everything["backed_off"]
    assert everything["bytes_saved"] == sum(r["bytes_saved"] for r in sens["layers"])
    plan = S.mixed_precision_plan(sens, 0.0, run)
    assert plan["verified"] and plan["measured"]["drop_points"] <= 0.0
    rules = parse_rules(json.loads(json.dumps(plan["rules"])))
    codes = _twin_codes(ptq(model, calib, rules), x)
    assert 100 * (base_acc - np.mean(codes.argmax(-1) == y)) <= 0.0
    assert plan["measured"]["accuracy"] == pytest.approx(np.mean(codes.argmax(-1) == y))
    assert all(r["drop_points"] <= 0 for r in sens["layers"] if r["name"] in plan["low_layers"])
    assert set(plan["low_layers"]) | set(plan["backed_off"]) == {
        r["name"] for r in sens["layers"] if r["drop_points"] <= 0}


def _row(name, saved, drop, dq=0.1):
    return {"name": name, "class": "Conv2D", "weights": saved * 2, "bytes_saved": saved, "file_bytes_saved": 0,
            "accuracy": 0.9, "drop_points": drop, "mean_abs_code_change": dq, "top1_changed": dq / 10}


def test_greedy_choice_and_back_off_on_made_up_numbers():
    sens = {"high": "w8a8", "low": "w4a8", "images": 1000, "layers": [
        _row("a", 1000, 0.4), _row("b", 800, 0.0), _row("c", 100, -0.3, dq=0.05), _row("d", 5000, 3.0),
        _row("e", 300, 0.2, dq=0.5), _row("f", 0, 0.0)]}
    # bytes per point of cost (drop >= 0, + 0.1 point = one image of 1000): b 8000, c 1000, a 2000, e 1000,
    # d 1613; ties broken by the smaller mean |delta code| (c before e). Greedy in that order, skipping what does
    # not fit: b, a (0.4), c; e would make 0.6
    plan = S.mixed_precision_plan(sens, 0.5)
    assert plan["low_layers"] == ["a", "b", "c"] and plan["predicted_drop_points"] == pytest.approx(0.4)
    assert not plan["verified"] and plan["measured"] is None
    assert S.mixed_precision_plan(sens, 0.6)["low_layers"] == ["a", "b", "c", "e"]
    assert "d" in S.mixed_precision_plan(sens, 3.6)["low_layers"]

    class Fake:  # measured drop: the sum of the chosen layers' drops, +1 point from `crowd` low layers on
        fast, log = False, staticmethod(lambda m: None)

        def __init__(self, crowd):
            self.crowd = crowd

        def measure(self, names, exact=False):
            drop = sum(max(r["drop_points"], 0) for r in sens["layers"] if r["name"] in names)
            drop += 1.0 if len(names) >= self.crowd else 0.0
            return {"accuracy": 0.9 - drop / 100, "drop_points": drop, "mean_abs_code_change": 0.0,
                    "top1_changed": 0.0}
    plan = S.mixed_precision_plan(sens, 0.5, Fake(3))
    assert plan["backed_off"] == ["a"] and plan["low_layers"] == ["b", "c"]  # a: the most sensitive chosen
    assert plan["verified"] and plan["measured"]["drop_points"] == 0
    plan = S.mixed_precision_plan(sens, 0.0, Fake(2))  # b, c: same cost, b changes more codes
    assert plan["backed_off"] == ["b"] and plan["low_layers"] == ["c"] and plan["measured"]["drop_points"] == 0
    assert parse_rules(plan["rules"]).rules[0].match == {"name": "c"}


def test_plot_is_a_png_and_the_table_lists_every_layer(setup, tmp_path):
    plan = S.mixed_precision_plan(setup["sens"], 1.0)
    path = S.plot_sensitivity(setup["sens"], tmp_path / "s.png", plan)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = S.format_table(setup["sens"], plan)
    assert all(name in table for name in ("stem", "dw", "pw", "head")) and "plan (budget 1.0 points)" in table


def test_cli_writes_sensitivity_plan_plot_and_a_file_the_twin_matches(setup, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["sensitivity", "--model-file", str(setup["root"] / "model.keras"), "--data",
                     str(setup["folder"]), "--budget", "0.5", "--low", "w4a8", "--calibration", "32", "--out",
                     str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["stem", "dw", "pw", "head"]
    rules = load_rules(out / "plan.json")
    assert rules.to_dict() == report["plan"]["rules"]
    assert report["plan"]["measured"]["drop_points"] <= 0.5
    f = report["plan_file"]
    assert f["max_lsb_vs_twin"] == 0 and f["accuracy"] == f["twin_accuracy"] == report["plan"]["measured"]["accuracy"]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG" and (out / "plan_int8.tflite").exists()
    assert "head" in text and "plan (budget 0.5 points)" in text and "LSB from the twin" in text


def test_errors_name_the_thing_and_the_fix(setup, tmp_path, capsys):
    run, sens = setup["run"], setup["sens"]
    for bad in (-0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="budget"):
            S.mixed_precision_plan(sens, bad)
    with pytest.raises(ValueError, match="fewer weight bits"):
        S.SensitivityRun(setup["model"], setup["calib"], setup["x"], setup["y"], "w4a8", "w8a8")
    with pytest.raises(ValueError, match="not rules"):
        S.SensitivityRun(setup["model"], setup["calib"], setup["x"], setup["y"], parse_rules([]), "w4a8")
    with pytest.raises(ValueError, match="'nope' is not a layer with weights"):
        S.layer_sensitivity(run, ["nope"])
    with pytest.raises(ValueError, match="as many labels"):
        S.SensitivityRun(setup["model"], setup["calib"], setup["x"], setup["y"][:3])
    inp = keras.Input((16, 16, 3))
    pooled = keras.Model(inp, L.Softmax()(L.GlobalAveragePooling2D()(inp)))
    with pytest.raises(ValueError, match="no layers with weights"):
        S.SensitivityRun(pooled, setup["calib"], setup["x"], setup["y"])
    out = str(tmp_path / "o")
    for argv, message in ((["--budget", "-1"], "budget=-1.0"),
                          (["--budget", "1", "--low", "w9"], "--low: unknown scheme 'w9'"),
                          (["--budget", "1", "--model-file", str(setup["root"] / "model.keras"), "--model",
                            "mobilenet_v1"], "drop them")):
        assert cli.main(["sensitivity", "--out", out, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
