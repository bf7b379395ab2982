"""Which Keras models mobileqat takes to a full-integer file with its integer twin, and plain tfmot's
result on the same models: ``mobileqat coverage``.

Each model (``MODELS``: 15 tf_keras.applications built with ``weights=None`` and 10 classes, and the
user patterns tfmot users report) runs in its own worker process, so a crash or an out-of-memory in
one does not end the table. Per model and per tool (mobileqat.quantize, tfmot's quantize_model):
quantize, a short fine-tune on random images (so every range is set), convert to int8 I/O, the share
of ops XNNPACK takes, the int8 size; for mobileqat also the integer twin's largest difference, in
output LSB, from the reference kernels and from XNNPACK on the same images (or why there is no twin);
and ("saving") whether mobileqat's QAT model saves as .h5 and SavedModel and loads back without
custom_objects with the same weights and outputs.
Results are kept per model in ``OUT/<model>.json``: a rerun skips the models already done.
"""
import json
import os
import time
import traceback

import numpy as np

# name -> (tf_keras.applications builder name or a pattern function below, input size, pixel range)
APPLICATIONS = {
    "MobileNet": 32, "MobileNetV2": 32, "MobileNetV3Small": 32, "MobileNetV3Large": 32, "EfficientNetB0": 32,
    "EfficientNetV2B0": 32, "ResNet50": 32, "ResNet50V2": 32, "DenseNet121": 32, "NASNetMobile": 32,
    "InceptionV3": 75, "Xception": 71, "VGG16": 32, "ConvNeXtTiny": 32, "RegNetX002": 32,
}
# models that scale pixels themselves (Rescaling/Normalization inside) take 0..255
_RAW_PIXELS = ("MobileNetV3", "EfficientNet", "ConvNeXt", "RegNet")


def _layers():
    from mobileqat._tf import keras
    return keras, keras.layers


def transfer_learning():
    """A MobileNetV2 backbone nested in a Sequential head (tfmot #602, #1139)."""
    keras, L = _layers()
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    return keras.Sequential([keras.Input((32, 32, 3)), base, L.GlobalAveragePooling2D(), L.Dropout(0.2),
                             L.Dense(10, activation="softmax")], name="transfer_learning")


def _conv_bn(x, filters, kernel=3, strides=1, name=None):
    _, L = _layers()
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    return L.ReLU(6.0)(L.BatchNormalization()(x))


def _pattern(name, body):
    """Input (32, 32, 3) -> body -> GAP -> Dense(10, softmax)."""
    keras, L = _layers()
    inp = keras.Input((32, 32, 3))
    return keras.Model(inp, L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(body(inp))), name=name)


def squeeze_excite():
    """Squeeze-excite gates: GAP(keepdims), 1x1 convs with bias, sigmoid, Multiply (tfmot #957)."""
    _, L = _layers()

    def body(inp):
        x = _conv_bn(inp, 16, strides=2)
        gate = L.GlobalAveragePooling2D(keepdims=True)(x)
        gate = L.Conv2D(4, 1, activation="relu")(gate)
        gate = L.Conv2D(16, 1, activation="sigmoid")(gate)
        return L.Multiply()([x, gate])
    return _pattern("squeeze_excite", body)


def concatenate():
    """Inception-style branches joined by Concatenate (tfmot #638)."""
    _, L = _layers()

    def body(inp):
        x = _conv_bn(inp, 8, strides=2)
        a, b = _conv_bn(x, 8, kernel=1), _conv_bn(x, 8)
        c = L.MaxPooling2D(3, strides=1, padding="same")(x)
        return L.Concatenate()([a, b, c])
    return _pattern("concatenate", body)


def separable():
    """SeparableConv2D blocks (Xception-style)."""
    _, L = _layers()

    def body(inp):
        x = _conv_bn(inp, 8, strides=2)
        return L.ReLU()(L.BatchNormalization()(L.SeparableConv2D(16, 3, padding="same", use_bias=False)(x)))
    return _pattern("separable", body)


def conv1d():
    """Conv1D over the rows of an image (tfmot #1145)."""
    _, L = _layers()

    def body(inp):
        x = L.Reshape((32, 96))(inp)
        x = L.ReLU()(L.Conv1D(16, 3, padding="same")(x))
        return L.Reshape((32, 1, 16))(x)
    return _pattern("conv1d", body)


def conv_transpose():
    """An encoder-decoder with Conv2DTranspose (tfmot #647)."""
    _, L = _layers()

    def body(inp):
        x = _conv_bn(inp, 8, strides=2)
        return L.ReLU()(L.Conv2DTranspose(8, 3, strides=2, padding="same")(x))
    return _pattern("conv2d_transpose", body)


def upsampling():
    """UpSampling2D (nearest and bilinear) in a decoder."""
    _, L = _layers()

    def body(inp):
        x = _conv_bn(inp, 8, strides=4)
        x = L.UpSampling2D(interpolation="nearest")(x)
        return L.UpSampling2D(interpolation="bilinear")(_conv_bn(x, 8))
    return _pattern("upsampling", body)


def subclassed_layer():
    """A custom layer subclass inside a functional model."""
    keras, L = _layers()

    class Scale(L.Layer):
        def call(self, x):
            return x * 0.5

    return _pattern("subclassed_layer", lambda inp: Scale()(_conv_bn(inp, 8)))


def shared_layer():
    """One layer called twice."""
    _, L = _layers()

    def body(inp):
        conv = L.Conv2D(3, 3, padding="same")
        return conv(conv(inp))
    return _pattern("shared_layer", body)


PATTERNS = {f.__name__: f for f in (transfer_learning, squeeze_excite, concatenate, separable, conv1d, conv_transpose,
                                    upsampling, subclassed_layer, shared_layer)}
MODELS = tuple(APPLICATIONS) + tuple(PATTERNS)


def build(name):
    """The float model ``name`` of ``MODELS`` (seed 0) and its pixel range."""
    keras, _ = _layers()
    keras.utils.set_random_seed(0)
    if name in PATTERNS:
        return PATTERNS[name](), (-1.0, 1.0)
    size = APPLICATIONS[name]
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
    return model, ((0.0, 255.0) if name.startswith(_RAW_PIXELS) else (-1.0, 1.0))


def _short(error, limit=160):
    text = str(error).strip().splitlines()
    first = next((t.strip() for t in text if t.strip().startswith("- ")), text[0] if text else type(error).__name__)
    more = sum(t.strip().startswith("- ") for t in text) - 1
    return (first[:limit] + (f" (+{more} more)" if more > 0 else "")).lstrip("- ")


def _fine_tune(qat, x, y):
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)


def _file_columns(path):
    from mobileqat import runtime
    row = {"int8_bytes": os.path.getsize(path)}
    cover, error = runtime.run_isolated(runtime.xnnpack_coverage, path, timeout=600)
    if error:
        row["xnnpack"] = f"error: {error}"
    else:
        row["xnnpack"] = round(cover["delegated"] / max(cover["total"], 1), 3)
        row["left_to_builtin"] = cover["left"]
    return row


def _twin_columns(qat, path, x):
    from mobileqat import lowering, runtime
    try:
        twin = lowering.lower(qat)
    except ValueError as e:
        return {"integer_path_error": _short(e)}
    row = {}
    codes = twin.quantize_input(x)
    for rt in ("reference", "xnnpack"):
        got, error = runtime.predict_isolated(path, rt, x)
        if error:
            row[f"lsb_{rt}"] = f"error: {error}"
            continue
        try:
            mine = twin.run(codes, rt).astype(np.int64)
        except ValueError as e:  # an op whose arithmetic this runtime's twin refuses
            row[f"lsb_{rt}"] = f"no twin: {_short(e)}"
            continue
        row[f"lsb_{rt}"] = int(np.abs(mine - got[0].astype(np.int64)).max())
    return row


SAVE_FORMATS = (".h5", "savedmodel")  # not .keras: tfmot's QuantizeLayer creates its variables twice on that load


def _saving(qat, x, folder, name):
    """Save the fine-tuned QAT model in each of ``SAVE_FORMATS``, load it back with ``load_qat_model`` (no
    custom_objects) and compare: {format: "ok" (same weights, bit for bit, the same outputs on ``x``, and
    ``export_tflite`` writes the same bytes as for the model before saving) or what went wrong}."""
    from mobileqat.export import export_tflite
    from mobileqat.quantize import load_qat_model

    def exported_bytes(model, tag):
        path = os.path.join(folder, f"{name}.{tag}.tflite")
        export_tflite(model, path)
        with open(path, "rb") as f:
            return f.read()

    want_w, want_y = qat.get_weights(), qat.predict(x, verbose=0)
    try:
        want_file = exported_bytes(qat, "before_saving")
    except Exception as e:  # noqa: BLE001 - the table records any failure
        return dict.fromkeys(SAVE_FORMATS, f"export before saving failed: {type(e).__name__}: {_short(e)}")
    row = {}
    for fmt in SAVE_FORMATS:
        path = os.path.join(folder, f"{name}.saved{fmt if fmt.startswith('.') else ''}")
        try:
            qat.save(path) if fmt != "savedmodel" else qat.save(path, save_format="tf")
            loaded = load_qat_model(path)
            got_w = loaded.get_weights()
            if len(got_w) != len(want_w) or any(not np.array_equal(a, b) for a, b in zip(got_w, want_w)):
                row[fmt] = "weights differ after loading"
            elif not np.array_equal(loaded.predict(x, verbose=0), want_y):
                row[fmt] = "outputs differ after loading"
            else:
                got_file = exported_bytes(loaded, "reloaded_" + fmt.lstrip("."))
                same = got_file == want_file
                row[fmt] = "ok" if same else (f"re-export differs ({len(got_file)} against {len(want_file)} bytes, "
                                              f"first difference at byte "
                                              f"{next(i for i, (a, b) in enumerate(zip(got_file, want_file)) if a != b) if len(got_file) == len(want_file) else 'n/a'})")
        except Exception as e:  # noqa: BLE001 - the table records any failure
            row[fmt] = f"{type(e).__name__}: {_short(e)}"
    return row


def _tool(tool, model, x, y, folder, name):
    """Quantize with ``tool`` ("mobileqat", "tfmot", or "saving": mobileqat's QAT model saved and loaded),
    fine-tune, export; the row's columns."""
    from mobileqat import export
    from mobileqat._tf import tfmot
    row, t0 = {}, time.time()
    try:
        if tool in ("mobileqat", "saving"):
            from mobileqat.quantize import quantize
            qat = quantize(model)
        else:
            qat = tfmot.quantization.keras.quantize_model(model)
        _fine_tune(qat, x, y)
        row["quantize"] = "ok"
    except Exception as e:  # noqa: BLE001 - the table records any failure
        row["quantize"] = f"{type(e).__name__}: {_short(e)}"
        return row
    if tool == "saving":
        return {**row, **_saving(qat, x[:8], folder, name), "seconds": round(time.time() - t0, 1)}
    path = os.path.join(folder, f"{name}.{tool}.tflite")
    try:
        export.export_tflite(qat, path) if tool == "mobileqat" else export.write_atomic(
            path, export.convert(qat, "qat_int8"))
        float_ops = export.tensor_types(path)["float_ops"]
        row["convert"] = "ok" if not float_ops else f"float ops left: {sorted(set(float_ops))}"
    except Exception as e:  # noqa: BLE001
        row["convert"] = f"{type(e).__name__}: {_short(e)}"
        return row
    row.update(_file_columns(path))
    if tool == "mobileqat":
        row.update(_twin_columns(qat, path, x))
    row["seconds"] = round(time.time() - t0, 1)
    return row


TOOLS = ("mobileqat", "tfmot", "saving")


def cover(name, folder, tools=TOOLS, images=32):
    """One model's row: {"model", "layers", "input_shape", and per tool in ``tools`` ("mobileqat",
    "tfmot", "saving") its columns}."""
    model, (low, high) = build(name)
    rng = np.random.default_rng(0)
    x = rng.uniform(low, high, (images,) + tuple(model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, images)
    row = {"model": name, "layers": len(model.layers), "input_shape": list(model.input_shape[1:])}
    for tool in tools:
        try:
            row[tool] = _tool(tool, model, x, y, folder, name)
        except Exception as e:  # noqa: BLE001
            row[tool] = {"quantize": f"crash: {type(e).__name__}: {_short(e)}", "trace": traceback.format_exc()[-2000:]}
    return row


def _cover_job(name, tools):
    import tempfile
    with tempfile.TemporaryDirectory(prefix="mobileqat-coverage-") as folder:  # the .tflite files
        return cover(name, folder, tools)


def run(out, models=MODELS, tools=TOOLS, again=False, timeout=3600, log=print):
    """Cover ``models`` with ``tools`` into ``out`` (one JSON per model, each model in a worker); a model's
    tools already in its JSON are skipped unless ``again`` (other tools' columns are kept). Returns the rows
    in order."""
    from mobileqat import runtime
    from mobileqat.export import write_atomic
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    os.makedirs(out, exist_ok=True)
    rows = []
    for name in models:
        path = os.path.join(out, f"{name}.json")
        before = {}
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
        todo = tuple(t for t in tools if again or t not in before)
        if not todo:
            rows.append(before)
            log(f"{name}: done before ({path})")
            continue
        t0 = time.time()
        row, error = runtime.run_isolated(_cover_job, name, todo, timeout=timeout)
        if error:
            row = {"model": name, **{t: {"quantize": f"crash: {error}"} for t in todo}}
        row = {**before, **row, "seconds": round(time.time() - t0, 1)}
        write_atomic(path, json.dumps(row, indent=1).encode())
        rows.append(row)
        log(f"{name}: {row['seconds']} s - " + format_row(row))
    return rows


def _cell(value, kind):
    if value is None:
        return "-"
    if kind == "fraction" and isinstance(value, float):
        return f"{100 * value:.0f} %"
    if kind == "bytes" and isinstance(value, int):
        return f"{value / 1024:.0f} KB"
    text = str(value)
    return "yes" if text == "ok" else ("no" if text else "-")


def _lsb(tool_row):
    if "integer_path_error" in tool_row:
        return "no twin"
    ref, xnn = tool_row.get("lsb_reference"), tool_row.get("lsb_xnnpack")
    if ref is None and xnn is None:
        return "-"
    show = [str(v) if isinstance(v, int) else "err" for v in (ref, xnn)]
    return " / ".join(show)


def _saved(row):
    s = row.get("saving")
    if s is None:
        return "not run"
    if s.get("quantize") != "ok":
        return "-"
    return " / ".join("yes" if s.get(f) == "ok" else "no" for f in SAVE_FORMATS)


HEADER = ("model", "quantize", "convert", "XNNPACK ops", "twin LSB ref / XNNPACK", "int8 size",
          "saves and loads (.h5 / SavedModel)", "tfmot quantize", "tfmot convert", "tfmot XNNPACK ops", "tfmot int8 size")


def format_row(row):
    m, t = row.get("mobileqat", {}), row.get("tfmot", {})
    return " | ".join([
        row["model"], _cell(m.get("quantize"), "") if "mobileqat" in row else "not run", _cell(m.get("convert"), ""), _cell(m.get("xnnpack"), "fraction"),
        _lsb(m) if m.get("convert") == "ok" else "-", _cell(m.get("int8_bytes"), "bytes"), _saved(row),
        _cell(t.get("quantize"), "") if "tfmot" in row else "not run", _cell(t.get("convert"), ""),
        _cell(t.get("xnnpack"), "fraction"),
        _cell(t.get("int8_bytes"), "bytes")])


def table(rows):
    """A Markdown table of the rows, then one line per model saying why a column is "no"."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + format_row(r) + " |" for r in rows]
    notes = []
    for r in rows:
        for tool in TOOLS:
            part = r.get(tool, {})
            for key in ("quantize", "convert", "integer_path_error") + (SAVE_FORMATS if tool == "saving" else ()):
                value = part.get(key)
                if value and value != "ok":
                    notes.append(f"- {r['model']}, {tool} {key.replace('_', ' ')}: {value}")
                    break
    done = sum(1 for r in rows if r.get("mobileqat", {}).get("lsb_reference") == 0
               and r.get("mobileqat", {}).get("lsb_xnnpack") == 0)
    summary = (f"mobileqat: {sum(r.get('mobileqat', {}).get('quantize') == 'ok' for r in rows)} of {len(rows)} quantize, "
               f"{sum(r.get('mobileqat', {}).get('convert') == 'ok' for r in rows)} convert to full int8, "
               f"{done} with the integer twin at 0 LSB on both runtimes, "
               f"{sum(all(r.get('saving', {}).get(f) == 'ok' for f in SAVE_FORMATS) for r in rows)} save and load "
               f"in every format; tfmot: "
               f"{sum(r.get('tfmot', {}).get('quantize') == 'ok' for r in rows)} quantize, "
               f"{sum(r.get('tfmot', {}).get('convert') == 'ok' for r in rows)} convert to full int8.")
    return "\n".join(lines + ["", summary, ""] + notes) + "\n"
