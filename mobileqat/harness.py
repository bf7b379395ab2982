"""Validation harness: run a .tflite on the reference kernels and XNNPACK, compare with the simulation.

Fidelity is measured on quantized outputs (DESIGN.md): a simulation's float output is quantized
with the TFLite output tensor's scale/zero point and compared integer to integer, so 1 LSB is one
output quantization step. Two simulations of a QAT model: its integer-exact path
(``mobileqat.lowering``, the runtime's own arithmetic) and the float fake-quant Keras model. Both
are fed exactly the images the integer model sees (the input quantized, then dequantized), so input
rounding is not counted as a mismatch.
Every interpreter runs in a worker process: a runtime that aborts is reported, not fatal.
"""
import os

import numpy as np

from mobileqat import faults, provenance, runtime as rt


quantize_output = rt.quantize  # float values -> integer codes of the output tensor (int64)


def compare_codes(a, b):
    """Two integer outputs (N, classes) -> top-1 agreement and LSB-difference statistics."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    diff = np.abs(a - b)
    return {"top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
            "frac_within_1lsb": float(np.mean(diff <= 1)),
            "max_lsb_diff": int(diff.max()) if diff.size else 0,
            "mean_lsb_diff": float(diff.mean()) if diff.size else 0.0}


def simulate(model, x, tflite_path, batch_size=256, description=None):
    """The Keras model's float outputs for the images the .tflite sees (input quantized+dequantized)."""
    m = description or rt.check_tflite(tflite_path)
    x_seen = np.asarray(x, np.float32)
    if m["input_dtype"] != "float32":
        scale, zero = m["input_quantization"]
        x_seen = (quantize_output(x_seen, scale, zero, m["input_dtype"]).astype(np.float32) - zero) * scale
    return model.predict(x_seen, batch_size=batch_size, verbose=0)


def integer_outputs(model, x, runtimes):
    """The QAT model's integer-exact outputs (dequantized floats, N x classes) per runtime whose
    arithmetic mobileqat reproduces, via ``mobileqat.lowering``. Returns ({runtime: outputs}, error
    message or None): a model that cannot be lowered, or an op a runtime's arithmetic does not cover,
    falls back to the float simulation for that runtime."""
    from mobileqat import lowering
    try:
        integer_model = lowering.lower(model)
    except ValueError as e:
        return {}, str(e)
    outputs, errors = {}, []
    for name in runtimes:
        if name in lowering.RUNTIMES:
            try:
                outputs[name] = integer_model.predict(x, name)
            except ValueError as e:
                errors.append(f"{name}: {e}")
    return outputs, "; ".join(errors) or None


def validate(tflite_path, x, y=None, model=None, runtimes=("reference", "xnnpack"), threads=1,
             batch_size=64):
    """Run ``tflite_path`` on each runtime over images ``x`` (N, H, W, C) float, labels ``y`` (N,).

    With a QAT ``model`` the file is compared with two simulations of it, on output codes:
    - the integer-exact path (``mobileqat.lowering``), in the arithmetic of that runtime; this is
      the simulation reported first ("simulation": "integer") for "reference" and "xnnpack";
    - the float fake-quant Keras model ("float_sim"), the one that trains.
    Returns {"runtimes": {name: {"accuracy", and with ``model``: "simulation", "top1_agreement",
    "frac_within_1lsb", "max_lsb_diff", "mean_lsb_diff", "float_sim": {same keys}} or
    {"error": message}}, "sim_accuracy" (float simulation), "integer_accuracy" {runtime: accuracy}
    (with model and y), "reference_vs_xnnpack": LSB statistics between runtimes}.
    Float-output files are compared by top-1 agreement and max absolute difference instead of LSB.

    Before any number is computed: the file is loaded in a worker process (an unreadable or corrupt
    file raises ``runtime.InvalidModelError`` naming it), ``x`` must hold at least one image, and
    with a ``model`` the file must have been exported from it (``provenance.check``; otherwise
    ``provenance.FileMismatchError`` names the first differing tensor). "provenance" in the result
    says how that was established.
    """
    desc = rt.check_tflite(tflite_path)
    x = check_images(x, desc, tflite_path)
    if y is not None and len(y) != len(x):
        raise ValueError(f"validate: {len(x)} images but {len(y)} labels; pass one label per image.")
    integer = desc["output_dtype"] != "float32"
    belongs = provenance.check(model, tflite_path) if model is not None else None
    sim = simulate(model, x, tflite_path, description=desc) if model is not None else None
    exact, lowering_error = integer_outputs(model, x, runtimes) if (model is not None and integer) else ({}, None)
    result = {"tflite_bytes": os.path.getsize(tflite_path), "runtimes": {}}
    if belongs is not None:
        result["provenance"] = belongs
    if lowering_error:
        result["integer_path_error"] = lowering_error
    if sim is not None and y is not None:
        result["sim_accuracy"] = _accuracy(sim, y)
        if exact:
            result["integer_accuracy"] = {name: _accuracy(out, y) for name, out in exact.items()}
    raw_by_runtime = {}
    for name in runtimes:
        out, error = rt.predict_isolated(tflite_path, name, x, threads, batch_size)
        if error:
            result["runtimes"][name] = {"error": error}
            continue
        raw, (scale, zero), dtype = out
        raw_by_runtime[name] = raw
        entry = {}
        if y is not None:
            entry["accuracy"] = _accuracy(raw, y)
        if sim is not None and integer:
            float_sim = compare_codes(quantize_output(sim, scale, zero, dtype), raw)
            if name in exact:
                entry.update(simulation="integer", **compare_codes(quantize_output(exact[name], scale, zero, dtype), raw))
            else:
                entry.update(simulation="float", **float_sim)
            entry["float_sim"] = float_sim
        elif sim is not None:
            entry.update(top1_agreement=float(np.mean(sim.argmax(-1) == raw.argmax(-1))),
                         max_abs_diff=float(np.abs(sim - raw).max()))
        result["runtimes"][name] = entry
        faults.point("validate")
    if integer and "reference" in raw_by_runtime and "xnnpack" in raw_by_runtime:
        result["reference_vs_xnnpack"] = compare_codes(raw_by_runtime["reference"], raw_by_runtime["xnnpack"])
    return result


def check_images(x, description, tflite_path):
    """``x`` as float32 (N, H, W, C) matching the file's input; ValueError naming the file otherwise."""
    x = np.asarray(x, np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"no images to run {tflite_path} on (the data set's test split is empty); pass a data set "
                         "with test images (e.g. an image folder with at least 2 images per class).")
    want = description["input_shape"][1:]
    if list(x.shape[1:]) != want:
        raise ValueError(f"images of shape {list(x.shape[1:])} do not fit {tflite_path}, which takes {want}; "
                         "load the data with the --input-size and --channels the model was trained with.")
    return x


def failed_runtimes(result):
    """Lines "runtime: error" of a validate/benchmark result, for every runtime that failed."""
    errors = {name: r["error"] for name, r in result.get("runtimes", {}).items() if "error" in r}
    errors.update(result.get("errors", {}))
    return [f"{name}: {error}" for name, error in errors.items()]


def _accuracy(outputs, y):
    return float(np.mean(np.asarray(outputs).argmax(-1) == np.asarray(y)))


def benchmark(tflite_path, runtimes=("xnnpack",), threads=1, warmup=10, runs=100):
    """Latency per runtime at batch 1: median and 90th percentile over ``runs`` invokes after
    ``warmup``, in milliseconds, with ``threads`` threads; and the file size in bytes. A runtime
    that fails goes to "errors"; an unreadable file raises ``runtime.InvalidModelError``."""
    rt.check_tflite(tflite_path)
    result = {"tflite_bytes": os.path.getsize(tflite_path), "threads": threads, "runs": runs,
              "latency_ms": {}, "latency_p90_ms": {}, "errors": {}}
    for name in runtimes:
        times, error = rt.latency_isolated(tflite_path, name, threads, warmup, runs)
        if error:
            result["errors"][name] = error
            continue
        result["latency_ms"][name] = float(np.median(times))
        result["latency_p90_ms"][name] = float(np.percentile(times, 90))
    return result


def benchmark_pair(path_a, path_b, runtimes=("xnnpack",), threads=(1,), warmup=10, runs=100):
    """Two files side by side (e.g. float vs int8), per runtime and thread count, measured in one worker with
    the invokes interleaved: medians and 90th percentiles (ms) of each, and ``ratio`` = the median of the
    per-pair ratios B/A (below 1: B is faster). Sizes and their ratio. A runtime that fails for either file goes
    to "errors" under "runtime/threads"."""
    for p in (path_a, path_b):
        rt.check_tflite(p)
    size_a, size_b = os.path.getsize(path_a), os.path.getsize(path_b)
    result = {"a": {"path": os.fspath(path_a), "bytes": size_a}, "b": {"path": os.fspath(path_b), "bytes": size_b},
              "size_ratio": size_b / size_a, "runs": runs, "warmup": warmup, "rows": [], "errors": {}}
    for name in runtimes:
        for n in threads:
            times, error = rt.paired_latency_isolated(path_a, path_b, name, n, warmup, runs)
            if error:
                result["errors"][f"{name}/{n}"] = error
                continue
            ta, tb = (np.asarray(t) for t in times)
            result["rows"].append({
                "runtime": name, "threads": n,
                "a_ms": float(np.median(ta)), "a_p90_ms": float(np.percentile(ta, 90)),
                "b_ms": float(np.median(tb)), "b_p90_ms": float(np.percentile(tb, 90)),
                "ratio": float(np.median(tb / ta))})
    return result


def pair_table(result):
    """A Markdown table of ``benchmark_pair``'s result."""
    a, b = os.path.basename(result["a"]["path"]), os.path.basename(result["b"]["path"])
    lines = [f"A = {result['a']['path']} ({result['a']['bytes']:,} bytes), B = {result['b']['path']} "
             f"({result['b']['bytes']:,} bytes), size B/A {result['size_ratio']:.3f}; {result['runs']} invokes each "
             f"after {result['warmup']} warm-up, interleaved",
             "", f"| runtime | threads | A: {a} median / p90 ms | B: {b} median / p90 ms | B/A (median of pair ratios) |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['a_ms']:.3f} / {r['a_p90_ms']:.3f} | "
                     f"{r['b_ms']:.3f} / {r['b_p90_ms']:.3f} | {r['ratio']:.3f} |")
    lines += [f"- {k}: {v}" for k, v in result["errors"].items()]
    return "\n".join(lines) + "\n"
