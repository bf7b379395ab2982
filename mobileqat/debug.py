"""Per-tensor fidelity debugger: every quantized activation of the Keras QAT model against its
tensor in the .tflite, on the reference kernels; and the reference kernels against the optimized
builtin kernels and XNNPACK, tensor by tensor.

XNNPACK keeps intermediate tensors inside its delegate, so its per-tensor values come from the
model's integer-exact path in XNNPACK arithmetic (``mobileqat.integer_xnnpack``); the result says
how far that path's output is from a real XNNPACK run of the file (0 LSB when it is exact).

Matching: the converter names each TFLite tensor after the TF ops it fused ("model/quant_conv2d/
Relu6;model/quant_conv2d/add;..."); the first Keras layer named there is the layer that produced
it, and the last op whose output carries that name is the layer's output. The Keras value is
quantized with the TFLite tensor's scale/zero point and compared as integer codes (LSB).
"""
import json
import os
import re

import numpy as np

from mobileqat import provenance, runtime as rt
from mobileqat.harness import compare_codes, quantize_output


def keras_quant_params(layer):
    """(scale, zero point) the QAT layer's output quantizer holds, or None (pass-through layer)."""
    if getattr(layer, "_output_quantizers", None):  # tfmot QuantizeWrapper
        quantizer, weights = layer._output_quantizers[0], layer._output_quantizer_vars
    elif hasattr(layer, "quantizer"):  # tfmot QuantizeLayer (the model input)
        quantizer, weights = layer.quantizer, layer.quantizer_vars
    else:
        return None
    from mobileqat.lowering import quantization_params
    config = quantizer.get_config()
    bits = config.get("num_bits", 8)
    if hasattr(quantizer, "fake_quant_range"):  # learned ranges (LSQ, PACT)
        scale, zp = quantization_params(*quantizer.fake_quant_range(weights), bits)
    elif weights and "min_var" in weights:
        scale, zp = quantization_params(weights["min_var"].numpy(), weights["max_var"].numpy(), bits)
    elif "min_value" in config:
        scale, zp = quantization_params(config["min_value"], config["max_value"], bits)
    else:
        return None
    return float(np.float32(scale)), zp


def _layer_of(tensor_name, layer_names):
    for part in tensor_name.split(";"):
        for segment in re.split(r"[/:]", part):
            if segment in layer_names:
                return segment
    return None


def tflite_activations(path, x, runtime="reference"):
    """Run the .tflite with every intermediate tensor kept.

    Returns (list of {"name", "index", "scale", "zero_point", "dtype", "value"} for every op output
    in execution order, the input scale/zero point)."""
    m = rt.TFLiteModel(path, runtime, preserve_all_tensors=True)
    m.invoke_raw(m.quantize_input(x))
    it = m.interpreter
    details = {t["index"]: t for t in it.get_tensor_details()}
    found = []
    for op in it._get_ops_details():
        for idx in op["outputs"]:
            t = details.get(idx)
            if t is None or t["dtype"] not in (np.int8, np.uint8, np.int16):
                continue
            try:
                value = it.get_tensor(idx)
            except ValueError:  # not kept (e.g. inside a delegate partition)
                continue
            scale, zero = t["quantization"]
            found.append({"name": t["name"], "index": idx, "op": op["op_name"], "scale": float(scale),
                          "zero_point": int(zero), "dtype": np.dtype(t["dtype"]).name, "value": value.copy()})
    return found, m.input_quantization


def debug_fidelity(qat_model, tflite_path, samples, compare_runtime="builtin", grow_threshold=1):
    """Compare every quantized activation of ``qat_model`` with the .tflite, layer by layer.

    The model must be the one exported (or loaded from its .h5): tensors are matched by layer name.
    samples: float images (N, H, W, C). Returns {"layers": [{"layer", "tflite_tensor", "op",
    "keras_scale", "keras_zero_point", "tflite_scale", "tflite_zero_point", "integer_max_lsb_diff",
    "max_lsb_diff", "mean_lsb_diff", "frac_within_1lsb", "local_max_lsb_diff", "runtime_max_lsb_diff",
    "xnnpack_max_lsb_diff", "xnnpack_mean_lsb_diff"}],
    "first_divergence": name of the first layer (execution order) whose max difference exceeds
    ``grow_threshold`` LSB, or None, "first_integer_divergence": the first layer where the
    integer-exact path differs at all, "integer_path_error"}.
    The file must have been exported from ``qat_model`` (``provenance.check``): otherwise
    ``provenance.FileMismatchError`` names the first differing tensor and no table is made.
    ``integer_max_lsb_diff``: the model's integer-exact path (``mobileqat.lowering``, reference
    arithmetic) against the file, accumulated (0 when it reproduces the file);
    ``*_lsb_diff``: the float Keras simulation, accumulated through the network;
    ``local_max_lsb_diff``: the layer alone, fed the TFLite's own input tensors (its own arithmetic);
    ``runtime_max_lsb_diff``: reference kernels vs ``compare_runtime`` on the same tensor;
    ``xnnpack_*_lsb_diff``: reference kernels vs XNNPACK on the same tensor (XNNPACK's arithmetic
    on the integer-exact path; "xnnpack_twin_output_max_lsb_diff" checks it against a real run).
    """
    from mobileqat._tf import keras
    from mobileqat.harness import check_images

    x = check_images(samples, rt.check_tflite(tflite_path), tflite_path)
    belongs = provenance.check(qat_model, tflite_path)  # FileMismatchError before any table
    found, error = rt.run_isolated(tflite_activations, os.fspath(tflite_path), x, "reference")
    if error:
        raise rt.RuntimeFailure(f"{tflite_path}: the reference kernels could not run the file ({error}); the "
                                "debugger compares every tensor with them. `mobileqat validate` shows which "
                                "runtimes run it.")
    ref, (in_scale, in_zero) = found
    other = {}
    if compare_runtime:  # a runtime that fails here is reported by validate(); keep the table
        found, error = rt.run_isolated(tflite_activations, os.fspath(tflite_path), x, compare_runtime)
        other = {t["name"]: t["value"] for t in found[0]} if not error else {}
    layers = [layer for layer in qat_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = {layer.name for layer in layers}
    last_tensor = {}
    for t in ref:
        owner = _layer_of(t["name"], names)
        if owner and not (t["op"] == "QUANTIZE" and owner in last_tensor):  # not a copy requantized for a join
            last_tensor[owner] = t
    if in_scale and layers and layers[0].name not in last_tensor:  # integer input: the graph input
        xq = rt.TFLiteModel(tflite_path, "reference").quantize_input(x)
        last_tensor[layers[0].name] = {"name": "input", "scale": in_scale, "zero_point": in_zero,
                                      "value": xq, "dtype": xq.dtype.name, "op": "INPUT"}
    integer_values, integer_error = _integer_activations(qat_model, x)
    xnnpack_values, xnnpack_error = _integer_activations(qat_model, x, "xnnpack") if integer_values else ({}, None)
    twin_check = _xnnpack_twin_check(tflite_path, x, xnnpack_values) if xnnpack_values else None
    from mobileqat.transforms import layer_nodes
    nodes = layer_nodes(qat_model)  # tfmot calls the input's QuantizeLayer once more, outside this model,
    probe = keras.Model(qat_model.inputs, [nodes[layer.name][0].outputs for layer in layers])  # when it feeds 2+ layers
    if in_scale:
        x_seen = (quantize_output(x, in_scale, in_zero, "int8").astype(np.float32) - in_zero) * in_scale
    else:
        x_seen = x
    values = probe.predict(x_seen, verbose=0)
    values = values if isinstance(values, list) else [values]
    rows, first, first_local, first_integer = [], None, None, None
    for layer, value in zip(layers, values):
        t = last_tensor.get(layer.name)
        if t is None or tuple(np.shape(value)) != tuple(t["value"].shape):
            continue
        codes = quantize_output(value, t["scale"], t["zero_point"], t["dtype"])
        stats = compare_codes(codes.reshape(len(x), -1), t["value"].reshape(len(x), -1))
        kq = keras_quant_params(layer)
        row = {"layer": getattr(layer, "layer", layer).name, "tflite_tensor": t["name"].split(";")[0],
               "op": t["op"], "keras_scale": kq[0] if kq else None, "keras_zero_point": kq[1] if kq else None,
               "tflite_scale": t["scale"], "tflite_zero_point": t["zero_point"],
               "max_lsb_diff": stats["max_lsb_diff"], "mean_lsb_diff": stats["mean_lsb_diff"],
               "frac_within_1lsb": stats["frac_within_1lsb"]}
        if layer.name in integer_values:
            row["integer_max_lsb_diff"] = int(np.abs(_codes_in(t, integer_values[layer.name]) - t["value"]).max())
            if first_integer is None and row["integer_max_lsb_diff"] > 0:
                first_integer = row["layer"]
        if layer.name in xnnpack_values:
            d = np.abs(_codes_in(t, xnnpack_values[layer.name]) - t["value"])
            row["xnnpack_max_lsb_diff"], row["xnnpack_mean_lsb_diff"] = int(d.max()), float(d.mean())
        row["local_max_lsb_diff"] = _local_error(layer, t, last_tensor)
        if t["name"] in other:
            d = np.abs(other[t["name"]].astype(np.int64) - t["value"].astype(np.int64))
            row["runtime_max_lsb_diff"] = int(d.max())
        rows.append(row)
        if first is None and row["max_lsb_diff"] > grow_threshold:
            first = row["layer"]
        if first_local is None and (row["local_max_lsb_diff"] or 0) > grow_threshold:
            first_local = row["layer"]
    return {"tflite": os.fspath(tflite_path), "samples": len(x), "compare_runtime": compare_runtime,
            "provenance": belongs,
            "layers": rows, "first_divergence": first, "first_local_divergence": first_local,
            "first_integer_divergence": first_integer, "integer_path_error": integer_error,
            "xnnpack_twin_output_max_lsb_diff": twin_check, "xnnpack_path_error": xnnpack_error}


def _xnnpack_twin_check(tflite_path, x, xnnpack_values):
    """Max LSB difference between the numpy XNNPACK twin's output and a real XNNPACK run of the file
    (0 when the per-tensor reference-vs-XNNPACK column can be trusted), or the run's error message."""
    out, error = rt.predict_isolated(tflite_path, "xnnpack", x)
    if error:
        return error
    raw, (scale, zero), dtype = out
    output = {"scale": scale, "zero_point": zero, "dtype": dtype, "value": raw}
    twin = xnnpack_values[next(reversed(xnnpack_values))]  # the graph output: the last op's tensor
    return int(np.abs(_codes_in(output, twin) - raw.astype(np.int64)).max())


def _integer_activations(qat_model, x, runtime="reference"):
    """Every tensor of the model's integer-exact path in ``runtime``'s arithmetic: ({layer name:
    (QTensor, int8 values)}, None), or ({}, why it cannot be lowered)."""
    from mobileqat import lowering
    try:
        integer_model = lowering.lower(qat_model)
        values = integer_model.run(integer_model.quantize_input(x), runtime, keep_all=True)
    except ValueError as e:
        return {}, str(e)
    return {name: (integer_model.tensors[name], v) for name, v in values.items()}, None


def _codes_in(tensor, integer_value):
    """An integer-path tensor (QTensor, int8 values) as codes of the TFLite tensor ``tensor``."""
    q, v = integer_value
    codes = quantize_output((v.astype(np.float64) - q.zero_point) * q.scale, tensor["scale"], tensor["zero_point"],
                            tensor["dtype"])
    return codes.reshape(tensor["value"].shape)


def _local_error(layer, out_tensor, tensors):
    """Max LSB difference of ``layer`` alone: fed the TFLite's own (dequantized) input tensors,
    its output against the TFLite output. None when an input has no matched TFLite tensor."""
    from mobileqat._tf import tf
    parents = tf.nest.flatten(layer.inbound_nodes[0].inbound_layers)
    feeds = []
    for parent in parents:
        t = tensors.get(parent.name)
        if t is None:
            return None
        feeds.append(tf.constant((t["value"].astype(np.float32) - t["zero_point"]) * t["scale"]))
    out = layer(feeds if len(feeds) > 1 else feeds[0], training=False).numpy()
    codes = quantize_output(out, out_tensor["scale"], out_tensor["zero_point"], out_tensor["dtype"])
    return int(np.abs(codes - out_tensor["value"].astype(np.int64)).max())


def format_table(result):
    """The debugger's result as a fixed-width text table."""
    head = (f"{'layer':28} {'op':18} {'keras scale/zp':>20} {'tflite scale/zp':>20} {'int max':>7} "
            f"{'max LSB':>7} {'mean LSB':>8} {'<=1 LSB':>8} {'local max':>9} "
            f"{'ref vs ' + (result['compare_runtime'] or '-'):>14} {'ref vs xnnpack':>14}")
    lines = [head, "-" * len(head)]
    for r in result["layers"]:
        kq = f"{r['keras_scale']:.5g}/{r['keras_zero_point']}" if r["keras_scale"] else "(input's)"
        tq = f"{r['tflite_scale']:.5g}/{r['tflite_zero_point']}"
        lines.append(f"{r['layer'][:28]:28} {r['op'][:18]:18} {kq:>20} {tq:>20} "
                     f"{_dash(r.get('integer_max_lsb_diff')):>7} {r['max_lsb_diff']:>7} "
                     f"{r['mean_lsb_diff']:>8.4f} {100 * r['frac_within_1lsb']:>7.2f}% "
                     f"{_dash(r.get('local_max_lsb_diff')):>9} {_dash(r.get('runtime_max_lsb_diff')):>14} "
                     f"{_dash(r.get('xnnpack_max_lsb_diff')):>14}")
    lines.append("int max: the integer-exact path (mobileqat.lowering); max/mean/<=1/local: the float Keras "
                 "simulation, accumulated and on its own; all in LSB of each tensor")
    lines.append(f"first layer over 1 LSB, float simulation accumulated: {result['first_divergence'] or 'none'}; "
                 f"on its own (local): {result['first_local_divergence'] or 'none'}; integer-exact path "
                 f"first differs at: {result.get('first_integer_divergence') or 'none'}")
    twin = result.get("xnnpack_twin_output_max_lsb_diff")
    if twin is not None:
        lines.append(f"ref vs xnnpack: the integer-exact path in XNNPACK arithmetic; its output vs a real XNNPACK "
                     f"run: {twin if isinstance(twin, str) else f'max {twin} LSB'}")
    if result.get("xnnpack_path_error"):
        lines.append(f"ref vs xnnpack not available: {result['xnnpack_path_error']}")
    if result.get("integer_path_error"):
        lines.append(f"integer-exact path not available: {result['integer_path_error']}")
    return "\n".join(lines)


def _dash(v):
    return "-" if v is None else str(v)


def plot(result, path):
    """Per layer (PNG): the float simulation's max/mean LSB difference as bars, the integer path's and
    XNNPACK's max as lines. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["layers"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
    idx = np.arange(len(rows))
    ax.bar(idx - 0.2, [r["max_lsb_diff"] for r in rows], 0.4, label="float simulation, max")
    ax.bar(idx + 0.2, [r["mean_lsb_diff"] for r in rows], 0.4, label="float simulation, mean")
    for key, label, style in (("integer_max_lsb_diff", "integer-exact path, max", "k.-"),
                              ("xnnpack_max_lsb_diff", "XNNPACK vs reference, max", "r.--")):
        if any(key in r for r in rows):
            ax.plot(idx, [r.get(key, np.nan) for r in rows], style, label=label)
    ax.set_xticks(idx, [r["layer"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("difference from the TFLite reference kernels (LSB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
    return os.fspath(path)


def write_json(result, path):
    from mobileqat.export import write_atomic
    return write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
