"""mobileqat coverage: one user pattern end to end, kept results reused, the table."""
import json

from mobileqat import coverage


def test_a_pattern_is_covered_once_and_tabled(tmp_path):
    logs = []
    (row,) = coverage.run(tmp_path, ["separable"], tools=("mobileqat",), log=logs.append)
    mq = row["mobileqat"]
    assert (mq["quantize"], mq["convert"], mq["lsb_reference"], mq["lsb_xnnpack"]) == ("ok", "ok", 0, 0), mq
    assert 0 < mq["xnnpack"] <= 1 and mq["int8_bytes"] > 0
    assert json.loads((tmp_path / "separable.json").read_text())["mobileqat"] == mq
    # a rerun reuses the row without a worker; another tool is added beside it, not in its place
    (again,) = coverage.run(tmp_path, ["separable"], tools=("mobileqat",), log=logs.append)
    assert again == row and "done before" in logs[-1]
    text = coverage.table([row])
    assert "| separable | yes | yes |" in text and "0 / 0" in text and "| not run |" in text
    (saved,) = coverage.run(tmp_path, ["separable"], tools=("saving",), log=logs.append)
    assert saved["mobileqat"] == mq  # kept
    assert {f: saved["saving"][f] for f in coverage.SAVE_FORMATS} == dict.fromkeys(coverage.SAVE_FORMATS, "ok")
    text = coverage.table([saved])
    assert "| yes / yes |" in text and "1 save and load in every format" in text
    assert "mobileqat: 1 of 1 quantize, 1 convert to full int8, 1 with the integer twin at 0 LSB" in text


def test_a_refused_pattern_says_why_in_the_notes(tmp_path):
    """Every pattern of the list quantizes now; a dilated convolution (still refused) goes through the same
    column code, in process."""
    import numpy as np
    from mobileqat._tf import keras
    inp = keras.Input((8, 8, 3))
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, dilation_rate=2, name="dil")(inp))
    x = np.zeros((4, 8, 8, 3), np.float32)
    part = coverage._tool("mobileqat", keras.Model(inp, out), x, np.zeros(4, int), str(tmp_path), "dilated")
    assert part["quantize"].startswith("ValueError: layer 'dil' (Conv2D): dilation_rate=(2, 2)")
    text = coverage.table([{"model": "dilated", "mobileqat": part}])
    assert "| dilated | no |" in text and "- dilated, mobileqat quantize: ValueError: layer 'dil' (Conv2D)" in text


def test_saving_re_exports_the_same_file_and_names_a_difference(tmp_path, monkeypatch):
    """After .h5 and SavedModel save/load the QAT model re-exports byte for byte the file it wrote before
    saving; a reloaded model whose weights were nudged is caught (the bytes are compared, not trusted)."""
    import numpy as np
    from mobileqat._tf import keras
    from mobileqat.quantize import quantize
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    y = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, name="conv")(inp))
    qat = quantize(keras.Model(inp, keras.layers.Dense(3, name="head")(y)))
    x = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
    qat(x, training=True)
    row = coverage._saving(qat, x, str(tmp_path), "tiny")
    assert row == dict.fromkeys(coverage.SAVE_FORMATS, "ok")
    files = {p.name: p.read_bytes() for p in tmp_path.glob("tiny.*.tflite")}
    assert sorted(files) == ["tiny.before_saving.tflite", "tiny.reloaded_h5.tflite", "tiny.reloaded_savedmodel.tflite"]
    assert len(set(files.values())) == 1

    import importlib
    q = importlib.import_module("mobileqat.quantize")  # the attribute mobileqat.quantize is the function
    load = q.load_qat_model

    def nudged(path):  # same weights where compared, but a different file: the output layer's name
        model = load(path)
        model.layers[-1]._name = "renamed_head"
        return model
    monkeypatch.setattr(q, "load_qat_model", nudged)
    row = coverage._saving(qat, x, str(tmp_path), "tiny")
    assert all(v.startswith("re-export differs") for v in row.values()), row
