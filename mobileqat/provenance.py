"""Does a .tflite belong to a Keras model? Fingerprints written at export, and the twin's check.

``fingerprint(model)``: sha256 over every layer's class and every weight that shapes the file
(values, shapes, dtypes; quantizer ranges included, tfmot's ``optimizer_step`` counter excluded).
``export_tflite`` stores it in the file's metadata (``mobileqat_fingerprint``).

``check(model, path)`` is what ``validate``, ``debug`` and ``run`` call before comparing numbers:
- the file's fingerprint equals the model's: it belongs (cheap, no file parsing beyond metadata);
- otherwise, for an integer file and a model that lowers, the integer twin (``mobileqat.lower``) is
  compared with the file op by op: op sequence, tensor scales and zero points, int8 weights, filter
  scales, int32 biases. The first difference raises ``FileMismatchError`` naming the tensor;
- a fingerprint that differs and no twin to say more also raises; no fingerprint and no twin is
  reported as unchecked.
"""
import hashlib
import json
import re

import numpy as np

from mobileqat import tflite_file

METADATA_NAME = "mobileqat_fingerprint"
_FIX = ("re-export the file from this model (mobileqat.export_tflite, or `mobileqat run`) or pass the model "
        "that produced it")


class FileMismatchError(ValueError):
    """The .tflite was not exported from the given model. The message names the first difference."""


def fingerprint(model):
    """'sha256:<hex>' of a Keras model's layer classes and output-shaping weights, in layer order."""
    h = hashlib.sha256()
    for layer in model.layers:
        h.update(type(layer).__name__.encode())
        inner = getattr(layer, "layer", None)
        if inner is not None:
            h.update(type(inner).__name__.encode())
        for w in layer.weights:
            if w.name.split("/")[-1].startswith("optimizer_step"):
                continue  # tfmot's step counter: changes with training, not with the file
            value = np.ascontiguousarray(w.numpy())
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(value.tobytes())
    return "sha256:" + h.hexdigest()


def metadata_entry(model, kind):
    """{METADATA_NAME: JSON bytes} recording ``model``'s fingerprint and the export ``kind``."""
    from mobileqat import __version__
    record = {"fingerprint": fingerprint(model), "kind": kind, "keras_model": model.name,
              "mobileqat": __version__}
    return {METADATA_NAME: json.dumps(record, sort_keys=True).encode()}


def read_record(path):
    """The fingerprint record a mobileqat export stored in ``path``, or None."""
    raw = tflite_file.read_metadata(path).get(METADATA_NAME)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"fingerprint": "unreadable"}


def check(model, path):
    """Raise FileMismatchError (one line: the file, the first differing tensor, the fix) when the
    .tflite at ``path`` was not exported from ``model``. Returns {"check": "fingerprint" |
    "integer_twin" | "unchecked", "detail": ...} saying how the match was established."""
    record = read_record(path)
    mine = fingerprint(model)
    if record is not None and record.get("fingerprint") == mine:
        return {"check": "fingerprint", "detail": mine}
    twin_error, difference = _twin_difference(model, path)
    if difference:
        raise FileMismatchError(f"{path} was not exported from model '{model.name}': {difference}; {_FIX}.")
    if twin_error is None:
        return {"check": "integer_twin", "detail": "every op, scale, zero point, weight and bias equal"}
    if record is not None:
        raise FileMismatchError(f"{path} was not exported from model '{model.name}': the file's fingerprint "
                                f"{record.get('fingerprint')} differs from the model's {mine}; {_FIX}.")
    return {"check": "unchecked", "detail": f"the file has no mobileqat fingerprint and {twin_error}"}


def _twin_difference(model, path):
    """(why the twin cannot be compared or None, first difference between twin and file or None)."""
    from mobileqat import lowering
    try:
        integer_model = lowering.lower(model)
    except ValueError as e:
        return f"the model has no integer twin ({e})", None
    return None, first_difference(integer_model, path)


def _file_graph(path):
    from mobileqat.runtime import TFLiteModel
    it = TFLiteModel(path, "reference").interpreter  # constants are readable without allocating
    return it, {t["index"]: t for t in it.get_tensor_details()}, it._get_ops_details()


def first_difference(integer_model, path):
    """The first place where ``integer_model`` (from ``mobileqat.lower``) and the .tflite differ, as
    text naming the file's tensor and the twin's layer, or None when they hold the same graph."""
    from mobileqat.lowering import TFLITE_OPS
    it, tensors, ops = _file_graph(path)
    file_ops = [op for op in ops if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "RESHAPE")
                and not _shape_arithmetic(op, tensors)]
    twin_ops = [op for op in integer_model.ops if op.kind in TFLITE_OPS]
    if file_ops and integer_model.input is not None:
        t_in = tensors[file_ops[0]["inputs"][_DATA_INPUT.get(file_ops[0]["op_name"], 0)]]
        why = _quantization_difference(t_in, integer_model.input)
        if why:
            return f"input tensor '{_short(t_in['name'])}': {why}"
    why = _first_op_difference(it, tensors, file_ops, twin_ops, integer_model)
    if why is None:
        return None
    # The converter may list parallel branches in another order than the Keras layers: when the twin's ops
    # pair with the file's along the graph's edges, compare them so paired (no difference or a value one).
    paired, same_graph = _in_file_order(ops, twin_ops, integer_model, int(it.get_input_details()[0]["index"]),
                                        tensors)
    return _first_op_difference(it, tensors, file_ops, paired, integer_model) if same_graph else why


def _first_op_difference(it, tensors, file_ops, twin_ops, integer_model):
    from mobileqat.lowering import TFLITE_OPS
    for i in range(max(len(file_ops), len(twin_ops))):
        if i >= len(file_ops) or i >= len(twin_ops):
            extra = (f"the model has {twin_ops[i].kind} (layer '{twin_ops[i].output}')" if i < len(twin_ops)
                     else f"the file has {file_ops[i]['op_name']}")
            return f"op {i}: {extra} where the other has none (file: {len(file_ops)} ops, model: {len(twin_ops)})"
        fop, lop = file_ops[i], twin_ops[i]
        if fop["op_name"] != TFLITE_OPS[lop.kind]:
            return (f"op {i}: the file has {fop['op_name']} where the model has {TFLITE_OPS[lop.kind]} "
                    f"(layer '{lop.output}')")
        t_out = tensors[fop["outputs"][0]]
        why = _quantization_difference(t_out, integer_model.tensors[lop.output])
        if why:
            return f"tensor '{_short(t_out['name'])}' (layer '{lop.output}'): {why}"
        if "weights" in lop.params:
            t_w = tensors[fop["inputs"][1]]
            bias_at = _BIAS_INPUT.get(fop["op_name"], 2)
            has_bias = len(fop["inputs"]) > bias_at and fop["inputs"][bias_at] >= 0
            t_b = tensors[fop["inputs"][bias_at]] if has_bias else None
            checks = (("weights", it.get_tensor(t_w["index"]), lop.params["weights"]),
                      ("filter scales", t_w["quantization_parameters"]["scales"],
                       np.atleast_1d(lop.params["filter_scales"])),
                      ("bias", None if t_b is None else it.get_tensor(t_b["index"]), lop.params["bias"]))
            for what, in_file, in_model in checks:
                if in_file is None or in_model is None:  # an op without bias (TRANSPOSE_CONV writes none)
                    if in_file is not in_model:
                        return (f"op {i} (layer '{lop.output}'): the {'file' if in_model is None else 'model'} "
                                f"has a {what} where the other has none")
                    continue
                why = _array_difference(in_file, in_model)
                if why:
                    tensor = t_b if what == "bias" else t_w
                    return f"tensor '{_short(tensor['name'])}' ({what} of layer '{lop.output}'): {why}"
    return None


# TRANSPOSE_CONV's inputs are (output shape, weights, data, bias); other ops start with the data input.
_DATA_INPUT, _BIAS_INPUT = {"TRANSPOSE_CONV": 2}, {"TRANSPOSE_CONV": 3}
_SHAPE_OPS = ("SHAPE", "STRIDED_SLICE", "PACK")


def _shape_arithmetic(op, tensors):
    """int32 ops computing a shape (TRANSPOSE_CONV's output shape under Keras' dynamic batch): no twin op."""
    return op["op_name"] in _SHAPE_OPS and all(np.dtype(tensors[i]["dtype"]) == np.int32 for i in op["outputs"])


def _in_file_order(ops, twin_ops, integer_model, input_index, tensors):
    """``twin_ops`` paired with the file's ops by graph position, in the file's order. A file op pairs with
    the unpaired twin op of the same TFLite op reading the twin tensors paired with its inputs (among
    several, the one whose layer the file's output tensor names); with none, the first unpaired twin op,
    which the comparison then reports. Twin ops left over follow, in their own order. Also returns whether every op
    paired along the edges (the same graph, up to the order of parallel branches)."""
    from mobileqat.lowering import TFLITE_OPS
    alias = {}  # twin identity/reshape outputs -> the tensor they carry
    for op in integer_model.ops:
        if op.kind not in TFLITE_OPS and op.inputs:
            alias[op.output] = alias.get(op.inputs[0], op.inputs[0])
    paired, left, order, same_graph = {input_index: integer_model.input.name}, list(twin_ops), [], True
    for op in ops:
        mapped = sorted(paired[i] for i in op["inputs"] if i in paired)
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE", "RESHAPE"):
            if mapped:
                paired[op["outputs"][0]] = mapped[0]
            continue
        if _shape_arithmetic(op, tensors):
            continue
        if not left:
            return order, False
        candidates = [t for t in left if TFLITE_OPS[t.kind] == op["op_name"]
                      and sorted(alias.get(n, n) for n in t.inputs) == mapped]
        named = [t for t in candidates
                 if t.output in re.split("[;/]", tensors[op["outputs"][0]]["name"])]
        same_graph &= bool(candidates)
        pick = (named or candidates or left)[0]
        left.remove(pick)
        order.append(pick)
        paired[op["outputs"][0]] = pick.output
    return order + left, same_graph and not left


def _short(name):
    return name.split(";")[0]


def _quantization_difference(t_file, q_model):
    scale, zero = t_file["quantization"]
    offset = 128 if np.dtype(t_file["dtype"]) == np.uint8 else 0
    if np.float32(scale) != np.float32(q_model.scale) or int(zero) - offset != int(q_model.zero_point):
        return (f"scale/zero point {np.float32(scale):.9g}/{int(zero) - offset} in the file, "
                f"{np.float32(q_model.scale):.9g}/{q_model.zero_point} in the model")
    return None


def _array_difference(in_file, in_model):
    a, b = np.asarray(in_file), np.asarray(in_model)
    if a.shape != b.shape:
        return f"shape {list(a.shape)} in the file, {list(b.shape)} in the model"
    differ = a != b
    if differ.any():
        return f"{int(differ.sum())} of {a.size} values differ"
    return None
