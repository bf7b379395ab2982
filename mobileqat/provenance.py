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
    file_ops = [op for op in ops if op["op_name"] not in _PASS_THROUGH]
    twin_ops = [op for op in integer_model.ops if op.kind in TFLITE_OPS]
    file_ops = _in_twin_order(file_ops, ops, integer_model, it) or file_ops
    if file_ops and integer_model.input is not None:
        t_in = tensors[file_ops[0]["inputs"][0]]
        why = _quantization_difference(t_in, integer_model.input)
        if why:
            return f"input tensor '{_short(t_in['name'])}': {why}"
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
            t_w, t_b = tensors[fop["inputs"][1]], tensors[fop["inputs"][2]]
            checks = (("weights", it.get_tensor(t_w["index"]), lop.params["weights"]),
                      ("filter scales", t_w["quantization_parameters"]["scales"],
                       np.atleast_1d(lop.params["filter_scales"])),
                      ("bias", it.get_tensor(t_b["index"]), lop.params["bias"]))
            for what, in_file, in_model in checks:
                why = _array_difference(in_file, in_model)
                if why:
                    tensor = t_b if what == "bias" else t_w
                    return f"tensor '{_short(tensor['name'])}' ({what} of layer '{lop.output}'): {why}"
    return None


_PASS_THROUGH = ("QUANTIZE", "DEQUANTIZE", "RESHAPE")


def _in_twin_order(file_ops, ops, integer_model, it):
    """The file's compute ops in the twin's order, matched by data flow (op name and the tensors each
    op reads), or None when they do not match one to one. The converter orders the branches of a graph
    its own way (not in Keras layer order); QUANTIZE/DEQUANTIZE/RESHAPE pass a tensor through."""
    from mobileqat.lowering import TFLITE_OPS
    same = {int(it.get_input_details()[0]["index"]): integer_model.input.name}  # file tensor -> twin tensor
    alias = {}
    produced = {int(i) for op in ops for i in op["outputs"]} | set(same)
    for op in ops:
        if op["op_name"] in _PASS_THROUGH:
            alias[int(op["outputs"][0])] = int(op["inputs"][0])

    def source(index):
        while index in alias:
            index = alias[index]
        return same.get(index)

    twin_alias, ordered, left = {}, [], list(file_ops)
    for lop in integer_model.ops:
        inputs = [twin_alias.get(n, n) for n in lop.inputs]
        if lop.kind not in TFLITE_OPS:  # identity/reshape: no compute op in the file
            twin_alias[lop.output] = inputs[0]
            continue
        match = next((f for f in left if f["op_name"] == TFLITE_OPS[lop.kind] and
                      [source(int(i)) for i in f["inputs"] if int(i) in produced] == inputs), None)
        if match is None:
            return None
        left.remove(match)
        ordered.append(match)
        same[int(match["outputs"][0])] = lop.output
    return ordered if not left else None


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
