"""The model package an app ships: model.tflite, labels.txt, manifest.json and golden vectors.

``write_package(qat, tflite, out, dataset)`` (``mobileqat export``, and the end of ``mobileqat run``/``demo``)
writes the folder in a temporary sibling and renames it at the end, so a failed write leaves no half-written
package. ``mobileqat.device_check`` (numpy, Pillow and ai-edge-litert only) checks one on a device. Layout
and the golden tensor format: README.md, "Deployment package"; the format itself: ``device_check``'s
docstring (``write_tensor``/``read_tensor``).
"""
import datetime
import json
import os
import platform
import shutil
import tempfile

import numpy as np
from PIL import Image

from mobileqat import device_check as dc, runtime as rt
from mobileqat.export import _umask
from mobileqat.data import (ImageFolderStream, _orientation, _read_image, _shrink, _to_rgb_or_l, normalize,
                            scale_pixels)

FORMAT_VERSION = 1
PIXEL_FORMULAS = {"-1..1": "x / 127.5 - 1", "0..1": "x / 255", "0..255": "x", "mean_std": "(x - mean) / std"}
MAX_PNG_SIDE = 4  # a golden PNG keeps its decoded size up to this many times the input side, else is resized


def _versions():
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "numpy", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    from mobileqat import __version__
    out["mobileqat"] = __version__
    out["converter"] = f"tensorflow {out['tensorflow']} TFLiteConverter"
    out["runtime"] = f"ai-edge-litert {out['ai-edge-litert']}"
    return out


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def layer_schemes(qat_model):
    """[{"layer", "class", "weights": quantizer config or None, "activations": quantizer config or None}]:
    how each layer of a QAT model is quantized (from its QuantizeConfig), in model order."""
    rows = []
    for layer in qat_model.layers:
        kind = type(layer).__name__
        if kind == "QuantizeLayer":
            q = layer.quantizer
            rows.append({"layer": layer.name, "class": "input", "weights": None,
                         "activations": {"quantizer": type(q).__name__, **q.get_config()}})
            continue
        config = getattr(layer, "quantize_config", None)
        if config is None:
            continue
        inner = getattr(layer, "layer", layer)
        wq = getattr(config, "weight_quantizer", None)
        oq = getattr(config, "output_quantizer", None)
        if wq is None:  # FoldedConvBN fake-quantizes its folded kernel itself
            wq = getattr(inner, "weight_quantizer", None)
        rows.append({"layer": inner.name, "class": type(inner).__name__,
                     "weights": None if wq is None else {"quantizer": type(wq).__name__, **wq.get_config()},
                     "activations": None if oq is None else {"quantizer": type(oq).__name__, **oq.get_config()}})
    return rows


def _output_meaning(qat_model, classes):
    last = qat_model.layers[-1]
    inner = getattr(last, "layer", last)
    act = getattr(inner, "activation", None)
    name = getattr(act, "__name__", None) or type(inner).__name__
    if "softmax" in str(name).lower():
        return f"class probabilities (softmax), index i = line i of labels.txt ({classes} classes); top-1 = argmax"
    return f"class scores (logits, no softmax), index i = line i of labels.txt ({classes} classes); top-1 = argmax"


def _golden_from_arrays(dataset, n):
    """In-memory Dataset (x in [-1, 1] = u / 127.5 - 1): (uint8 images (n, H, W, C), labels) of the first n
    test images; ValueError when the arrays are not 8-bit pixels scaled that way."""
    x = np.asarray(dataset.x_test[:n], np.float32)
    u = np.clip(np.round((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if not np.array_equal(normalize(u), x):
        raise ValueError(f"data set {dataset.name!r}: its test images are not 8-bit pixels scaled x/127.5 - 1, so "
                         "no PNG holds them exactly; write the package from an image folder "
                         "(mobileqat.image_folder_stream) instead.")
    return u, np.asarray(dataset.y_test[:n], np.int64)


def _decoded_png(path, hw, channels):
    """An image file decoded as the loader decodes it (EXIF rotation, RGB or L, alpha onto black), kept at its
    size when no side exceeds MAX_PNG_SIDE x the input side, else resized to the input: a PIL image."""
    side = max(hw)
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (2 * side, 2 * side))
        im.load()
        method = _orientation(im)
        small = _shrink(im, side)
        im = small if method is None else small.transpose(method)
        im = _to_rgb_or_l(im, channels)
        if max(im.size) > MAX_PNG_SIDE * side:
            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
        return im.copy()


def write_package(qat_model, tflite_path, out, dataset, golden=256, report=None, threads=1, log=None,
                  trace_mb=16):
    """Write the package folder ``out`` for ``tflite_path`` (exported from QAT model ``qat_model``).

    dataset: a ``mobileqat.data.Dataset`` (in memory, pixels x/127.5 - 1) or an ``ImageFolderStream``; the
    first ``golden`` test images become golden/: PNGs, their input tensors (quantized here by mobileqat's
    loader and ``scale_pixels``), the reference-kernel and XNNPACK output codes (each runtime in a worker
    process, batch 1) and the labels. The integer twin (``mobileqat.lowering``) is run on the same inputs and
    its agreement with each runtime recorded. golden/trace: every op's output tensor on each runtime for as many golden
    inputs as fit in ``trace_mb`` MB (all of them for small models; None: all) (so a device can name the first op that differs), each
    compared with the twin's tensor. report: report.json of the run (test-set accuracy, fidelity),
    copied into the manifest. ``out`` is replaced only if it is a previous package or empty.
    Returns the manifest dict.
    """
    say = log or (lambda msg: None)
    out = os.path.abspath(os.fspath(out))
    tflite_path = os.fspath(tflite_path)
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or
                                                            os.path.isfile(os.path.join(out, "manifest.json")))):
        raise ValueError(f"{out} exists and is not a mobileqat package; pass another --out or remove it.")
    desc = rt.check_tflite(tflite_path)
    if desc["input_dtype"] == "float32" or desc["output_dtype"] == "float32":
        raise ValueError(f"{tflite_path}: float input/output; a package holds a full-integer file (export it "
                         "with io_type int8 or uint8).")
    n_golden = int(golden)
    if n_golden < 1:
        raise ValueError(f"golden={golden!r}: use at least 1 golden image.")
    h, w, c = desc["input_shape"][1:]
    streamed = isinstance(dataset, ImageFolderStream)
    if tuple(dataset.input_shape) != (h, w, c):
        raise ValueError(f"data of shape {tuple(dataset.input_shape)} does not fit {tflite_path}, which takes "
                         f"{(h, w, c)}; read the images at the model's input size and channels.")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by a write that was killed: never a package
        if stale.startswith((".tmp-" + os.path.basename(out) + "-", ".tmp-old-" + os.path.basename(out) + "-")):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "golden", "images"))
        shutil.copyfile(tflite_path, os.path.join(tmp, "model.tflite"))
        names = [str(n) for n in dataset.class_names]
        if any("\n" in n or "\r" in n for n in names):
            raise ValueError("a class name holds a line break; labels.txt has one name per line: rename the class.")
        with open(os.path.join(tmp, "labels.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(n + "\n" for n in names))

        # golden images: PNG, then the input tensor from that PNG by mobileqat's own loader
        in_scale, in_zero = desc["input_quantization"]
        images = []
        if streamed:
            files, y = dataset.test_files[:n_golden], np.asarray(dataset.y_test[:n_golden], np.int64)
            pix = np.empty((len(files), h, w, c), np.uint8)
            for i, path in enumerate(files):
                rel = f"golden/images/{i:04d}.png"
                _decoded_png(path, (h, w), c).save(os.path.join(tmp, rel), format="PNG")
                pix[i] = _read_image(os.path.join(tmp, rel), (h, w), c)
                images.append(rel)
            x = dataset.scale(pix)
            pixels = {"pixels": dataset.pixels, "mean": None if dataset.mean is None else dataset.mean.tolist(),
                      "std": None if dataset.std is None else dataset.std.tolist()}
        else:
            pix, y = _golden_from_arrays(dataset, n_golden)
            for i, img in enumerate(pix):
                rel = f"golden/images/{i:04d}.png"
                Image.fromarray(img[..., 0] if c == 1 else img, "L" if c == 1 else "RGB").save(
                    os.path.join(tmp, rel), format="PNG")
                images.append(rel)
            x = scale_pixels(pix, "-1..1")
            pixels = {"pixels": "-1..1", "mean": None, "std": None}
        if not len(images):
            raise ValueError(f"data set {dataset.name!r} has no test images for the golden set.")
        codes = rt.quantize(x, in_scale, in_zero, desc["input_dtype"]).astype(desc["input_dtype"])
        say(f"package: {len(images)} golden images, running reference kernels and XNNPACK")
        outputs = {}
        model_in_tmp = os.path.join(tmp, "model.tflite")
        for name in dc.RUNTIMES:
            got, error = rt.run_isolated(dc.invoke_codes, model_in_tmp, name, threads, codes)
            if error:
                raise rt.RuntimeFailure(f"{tflite_path} on {name}: {error}; no package was written.")
            outputs[name] = got
        dc.write_tensor(os.path.join(tmp, "golden", "input.bin"), codes)
        dc.write_tensor(os.path.join(tmp, "golden", "labels.bin"), y.astype(np.int32))
        for name in dc.RUNTIMES:
            dc.write_tensor(os.path.join(tmp, "golden", f"{name}.bin"), outputs[name])

        ops, error = rt.run_isolated(dc.traced_ops, model_in_tmp)
        per_image = 2 * sum(op["bytes"] for op in ops) if ops else 1
        n_trace = len(images) if trace_mb is None else max(1, min(len(images), int(trace_mb * 2**20) // per_image))
        traces = {}
        for name in dc.RUNTIMES:
            if error:
                break
            traces[name], error = rt.run_isolated(dc.trace, model_in_tmp, name, threads, codes[:n_trace], ops)
        if error:
            raise rt.RuntimeFailure(f"{tflite_path}: tracing the ops failed ({error}); no package was written.")
        ops = [op for op in ops if all(traces[r][op["tensor"]].dtype.name in dc.DTYPE_CODES for r in dc.RUNTIMES)]
        for k, op in enumerate(ops):
            for name in dc.RUNTIMES:
                rel = f"golden/trace/{name}/{k:03d}.bin"
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                dc.write_tensor(os.path.join(tmp, rel), traces[name][op["tensor"]])
                op[name] = rel

        golden_numbers = {name: {"accuracy": float(np.mean(outputs[name].argmax(-1) == y))} for name in dc.RUNTIMES}
        golden_numbers["reference_vs_xnnpack"] = dc.compare(outputs["xnnpack"], outputs["reference"])
        twin = _twin_agreement(qat_model, codes, desc, outputs, model_in_tmp, ops, traces, n_trace)
        machines = _aarch64_codes(qat_model, codes, desc, outputs, ops, traces, n_trace, twin, tmp)
        out_scale, out_zero = desc["output_quantization"]
        sha = dc.sha256(model_in_tmp)
        manifest = {
            "format": dc.FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"file": "model.tflite", "sha256": sha, "bytes": os.path.getsize(model_in_tmp),
                      "name": qat_model.name, "ops": desc["ops"]},
            "input": {"shape": [1, h, w, c], "dtype": desc["input_dtype"], "scale": float(in_scale),
                      "zero_point": int(in_zero), "layout": "NHWC"},
            "preprocessing": {
                "decode": "Pillow Image.open; EXIF orientation applied; transparent images composited onto black",
                "color": "RGB" if c == 3 else "L", "channels": c,
                "channel_order": "RGB" if c == 3 else "L (ITU-R 601-2 luma of RGB, Pillow convert('L'))",
                "resize": {"method": "bilinear", "height": h, "width": w, "keep_aspect_ratio": False,
                           "implementation": "Pillow Image.resize((width, height), Image.BILINEAR); skipped when the "
                                             "image already has that size"},
                **pixels, "formula": PIXEL_FORMULAS[pixels["pixels"]] + ", x = pixel value 0..255, in float32",
                "quantize": "q = clamp(round_half_away_from_zero(x / scale) + zero_point, dtype min, dtype max), "
                            "computed in float64 with the input scale and zero_point"},
            "output": {"shape": [int(d) for d in desc["output_shape"]], "dtype": desc["output_dtype"],
                       "scale": float(out_scale), "zero_point": int(out_zero),
                       "meaning": _output_meaning(qat_model, len(names)), "labels": "labels.txt",
                       "dequantize": "value = (q - zero_point) * scale"},
            "schemes": layer_schemes(qat_model),
            "validation": {
                "platform": {"machine": platform.machine(), "cpu": _cpu_name(), "system": platform.system()},
                "runtimes": {"reference": "ai_edge_litert Interpreter, OpResolverType.BUILTIN_REF",
                             "xnnpack": "ai_edge_litert Interpreter, OpResolverType.AUTO (XNNPACK delegate)"},
                "threads": threads, "golden": golden_numbers, "integer_twin": twin,
                "test_set": _test_set_numbers(report)},
            "versions": _versions(),
            "golden": {"count": len(images), "images": images, "input": "golden/input.bin",
                       "labels": "golden/labels.bin", "reference": "golden/reference.bin",
                       "xnnpack": "golden/xnnpack.bin",
                       "tensor_format": "MQGT v1 (README.md, 'Deployment package')",
                       "machines": machines},
            "trace": {"images": n_trace, "runtimes": list(dc.RUNTIMES), "ops": ops,
                      "how": "each op's output tensor for the first `images` golden inputs, the model run with that "
                             "tensor as its graph output (device_check.with_output)"},
        }
        files = {}
        for root, _, fnames in os.walk(tmp):
            for fname in sorted(fnames):
                full = os.path.join(root, fname)
                rel = os.path.relpath(full, tmp).replace(os.sep, "/")
                files[rel] = {"bytes": os.path.getsize(full), "sha256": dc.sha256(full)}
        manifest["files"] = dict(sorted(files.items()))
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"package: {out} (model sha256 {sha[:16]}..., {len(images)} golden images)")
    return manifest


def _swap_in(tmp, out):
    """Rename the finished ``tmp`` folder to ``out``; a previous package there is moved aside first and
    removed after, so ``out`` is always either the old or the new package, never a mix."""
    from mobileqat import faults
    faults.point("write", os.path.basename(out))
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    old = tempfile.mkdtemp(prefix=".tmp-old-" + os.path.basename(out) + "-", dir=os.path.dirname(out))
    os.rmdir(old)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _twin_agreement(qat_model, codes, desc, outputs, model_path, ops, traces, n_trace):
    """The integer twin's output codes vs each runtime's on the golden inputs, and its tensor of every traced op
    vs the runtime's ("per_op"); or the reason there is no twin."""
    from mobileqat import lowering, provenance
    try:
        twin = lowering.lower(qat_model)
    except ValueError as e:
        return {"integer_path_error": str(e)}
    shift = 128 if desc["input_dtype"] == "uint8" else 0  # the twin computes int8; uint8 I/O is int8 + 128
    x8 = (codes.astype(np.int32) - shift).astype(twin.dtype)  # int16 codes for an int16x8 file
    result = {}
    for name in dc.RUNTIMES:
        try:
            mine = twin.run(x8, name).astype(np.int64) + (128 if desc["output_dtype"] == "uint8" else 0)
        except ValueError as e:
            result[name] = {"integer_path_error": str(e)}
            continue
        result[name] = dc.compare(mine.reshape(outputs[name].shape), outputs[name])
    try:
        where = provenance.file_tensors(twin, model_path)
    except ValueError as e:
        for name in result:
            result[name]["per_op"] = {"error": str(e)}
        return result
    by_file = {index: tname for tname, index in where.items()}
    for name in dc.RUNTIMES:
        if "integer_path_error" in result[name]:
            continue
        values = twin.run(x8[:n_trace], name, keep_all=True)
        rows, first = [], None
        for op in ops:
            tname = by_file.get(op["tensor"])
            if tname is None or tname not in values:
                continue
            got = values[tname].astype(np.int64) + (128 if traces[name][op["tensor"]].dtype == np.uint8 else 0)
            want = traces[name][op["tensor"]].astype(np.int64)
            d = int(np.abs(got.reshape(want.shape) - want).max()) if got.size == want.size else None
            rows.append(d)
            if first is None and d != 0:
                first = {"op": op["op"], "index": op["index"], "name": op["name"], "max_lsb_diff": d}
        result[name]["per_op"] = {"ops_compared": len(rows), "of": len(ops), "images": n_trace,
                                  "max_lsb_diff": max((r for r in rows if r is not None), default=None),
                                  "first_difference": first}
    return result


def _twin_values(twin, x8, runtime, softmax=None, keep_all=False):
    """The twin's tensors for int8 inputs ``x8`` in ``runtime`` arithmetic, with int8 SOFTMAX computed by
    ``softmax`` (same signature as ``integer.softmax_lut``) when given."""
    from mobileqat import lowering
    arith = lowering._arithmetic(runtime)
    values = {twin.input.name: np.asarray(x8, np.int8)}
    for op in twin.ops:
        if op.kind == "softmax" and softmax is not None:
            t_in = twin.tensors[op.inputs[0]]
            values[op.output] = softmax(values[op.inputs[0]], t_in.scale, t_in.zero_point)
        else:
            values[op.output] = twin._eval(op, values, arith, runtime)
    return values if keep_all else values[twin.output.name]


def _aarch64_codes(qat_model, codes, desc, outputs, ops, traces, n_trace, twin_result, tmp):
    """{"aarch64": {"xnnpack": golden file, "source": ..., "images_differing_from_x86": n}} when the file has an
    int8 SOFTMAX (the one op whose XNNPACK-runtime arithmetic differs on aarch64: the builtin kernel's uint16
    exp table, ``integer.softmax_lut_uint16``), computed by the integer twin; trace ops get "xnnpack.aarch64".
    {} when there is no SOFTMAX or no twin (the aarch64 device is then held to the x86-64 codes)."""
    from mobileqat import integer, lowering, provenance
    if "SOFTMAX" not in desc["ops"] or "integer_path_error" in twin_result or \
            any("integer_path_error" in r for r in twin_result.values()):
        return {}
    twin = lowering.lower(qat_model)
    if not any(op.kind == "softmax" for op in twin.ops):
        return {}
    shift = 128 if desc["input_dtype"] == "uint8" else 0
    x8 = (codes.astype(np.int16) - shift).astype(np.int8)
    out_shift = 128 if desc["output_dtype"] == "uint8" else 0
    arm = (_twin_values(twin, x8, "xnnpack", integer.softmax_lut_uint16).astype(np.int64) + out_shift)
    arm = arm.reshape(outputs["xnnpack"].shape).astype(outputs["xnnpack"].dtype)
    dc.write_tensor(os.path.join(tmp, "golden", "xnnpack.aarch64.bin"), arm)
    by_file = {index: name for name, index in provenance.file_tensors(twin, os.path.join(tmp, "model.tflite")).items()}
    values = _twin_values(twin, x8[:n_trace], "xnnpack", integer.softmax_lut_uint16, keep_all=True)
    for k, op in enumerate(ops):
        if op["op"] == "SOFTMAX" and by_file.get(op["tensor"]) in values:
            v = values[by_file[op["tensor"]]].astype(np.int64) + (128 if traces["xnnpack"][op["tensor"]].dtype == np.uint8 else 0)
            rel = f"golden/trace/xnnpack.aarch64/{k:03d}.bin"
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            dc.write_tensor(os.path.join(tmp, rel), v.reshape(traces["xnnpack"][op["tensor"]].shape).astype(
                traces["xnnpack"][op["tensor"]].dtype))
            op["xnnpack.aarch64"] = rel
    differ = int(np.sum(np.any(arm.reshape(len(arm), -1) != outputs["xnnpack"].reshape(len(arm), -1), axis=1)))
    return {"aarch64": {"xnnpack": "golden/xnnpack.aarch64.bin", "images_differing_from_x86": differ,
                        "source": "the integer twin in XNNPACK arithmetic with the aarch64 builds' int8 SOFTMAX "
                                  "(uint16 exp table, mobileqat.integer.softmax_lut_uint16); every other op as on "
                                  "x86-64"}}


def _test_set_numbers(report):
    """The run's held-out test-set numbers (report.json), or None when the package was written without a run."""
    if not report:
        return None
    q = report.get("variants", {}).get("qat_int8", {})
    fid = q.get("fidelity", {})
    keep = ("simulation", "top1_agreement_reference", "top1_agreement_xnnpack", "frac_within_1lsb", "max_lsb_diff",
            "frac_within_1lsb_xnnpack", "max_lsb_diff_xnnpack", "reference_vs_xnnpack", "integer_path_error")
    return {"images": report.get("dataset", {}).get("test"), "dataset": report.get("dataset", {}).get("name"),
            "accuracy_xnnpack": q.get("accuracy"), "accuracy_reference": q.get("accuracy_reference"),
            "float_accuracy_xnnpack": report.get("variants", {}).get("float", {}).get("accuracy"),
            "latency_ms": q.get("latency_ms"), "fidelity": {k: fid[k] for k in keep if k in fid}}


def export_package(qat_model, out, dataset, io_type=None, golden=256, report=None, threads=1, log=None):
    """Export ``qat_model`` to full-integer TFLite and write the package ``out`` (``write_package``)."""
    from mobileqat.export import export_tflite
    parent = os.path.dirname(os.path.abspath(os.fspath(out)))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-export-", dir=parent) as folder:
        path = os.path.join(folder, "model.tflite")
        export_tflite(qat_model, path, "qat_int8", io_type=io_type)
        return write_package(qat_model, path, out, dataset, golden=golden, report=report, threads=threads, log=log)


def write_run_package(out_dir, dataset, report, golden=256, threads=1, log=None):
    """The package of a finished ``run_pipeline`` in ``out_dir``: OUT/package from OUT/qat_int8.tflite and
    OUT/qat_model.h5, golden images from the run's test split, the report's test-set numbers."""
    from mobileqat.quantize import load_qat_model
    out_dir = os.fspath(out_dir)
    qat = load_qat_model(os.path.join(out_dir, "qat_model.h5"))
    return write_package(qat, os.path.join(out_dir, "qat_int8.tflite"), os.path.join(out_dir, "package"), dataset,
                         golden=golden, report=report, threads=threads, log=log)


def demo_package(out, golden=48, seed=0, data_dir=None, model_path=None, log=print):
    """A tiny real package (``make arm64-check``, tests): 600 synthetic-shapes training images drawn at 32 px and
    saved as PNGs in an image folder (``data_dir``, default a temporary one), read at 16 px, so the golden PNGs
    exercise the resize; a small CNN (conv, 2 x (depthwise, conv), pooling, dense, softmax) trained 20
    epochs, QAT 3 epochs, exported int8 and packaged with ``golden`` test images. ``model_path``: also save the QAT model
    there (.h5). Returns the manifest."""
    from mobileqat._tf import keras
    from mobileqat.data import image_folder_stream, synthetic_shapes
    from mobileqat.export import save_keras_model
    from mobileqat.quantize import quantize
    from mobileqat.training import fit
    L = keras.layers
    n_train = 600
    with tempfile.TemporaryDirectory(prefix="mobileqat-demo-data-") as scratch:
        folder = os.fspath(data_dir) if data_dir else os.path.join(scratch, "images")
        ds = synthetic_shapes(n_train=n_train, n_test=golden, image_size=32, seed=seed, difficulty=0.5)
        for split, xs, ys in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
            for i, (img, label) in enumerate(zip(xs, ys)):
                d = os.path.join(folder, ds.class_names[label])
                os.makedirs(d, exist_ok=True)
                u = np.round((img.astype(np.float64) + 1) * 127.5).astype(np.uint8)
                Image.fromarray(u, "RGB").save(os.path.join(d, f"{split}{i:04d}.png"))
        stream = image_folder_stream(folder, image_size=16, channels=3, seed=seed,
                                     test_fraction=golden / (n_train + golden))
        x_train, y_train = stream.arrays("train")
        keras.utils.set_random_seed(seed)
        inp = keras.Input((16, 16, 3))
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.DepthwiseConv2D(3, strides=2, padding="same",
                                                                             use_bias=False)(x)))
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 1, use_bias=False)(x)))
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.DepthwiseConv2D(3, strides=2, padding="same",
                                                                             use_bias=False)(x)))
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 1, use_bias=False)(x)))
        x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
        model = keras.Model(inp, L.Activation("softmax")(x), name="demo_cnn")
        fit(model, x_train, y_train, 20, 32, 1e-2, seed=seed, verbose=0)
        qat = quantize(model, "w8a8")
        fit(qat, x_train, y_train, 3, 32, 1e-3, seed=seed + 1, verbose=0)
        if model_path:
            save_keras_model(qat, model_path)
        return export_package(qat, out, stream, golden=golden, log=log)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="python -m mobileqat.package --demo OUT: write a tiny demo package")
    p.add_argument("--demo", required=True, metavar="OUT")
    p.add_argument("--golden", type=int, default=48)
    args = p.parse_args(argv)
    demo_package(args.demo, golden=args.golden)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
