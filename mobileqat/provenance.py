"""Does a .tflite belong to a Keras model? Fingerprints written at export, and the twin's check.

``fingerprint(model)``: sha256 over every layer's class and every weight that shapes the file
(values, shapes, dtypes; quantizer ranges included, tfmot's ``optimizer_step`` counter excluded).
``export_tflite`` stores it in the file's metadata (``mobileqat_fingerprint``).

``check(model, path)`` is what ``validate``, ``debug`` and ``run`` call before comparing numbers:
- the file's fingerprint equals the model's: it belongs (cheap, no file parsing beyond metadata);
- otherwise, for an integer file and a model that lowers, the integer twin (``mobileqat.lower``) is
  compared with the file op by op, ops matched through the graph (not by position): op kinds, tensor
  scales and zero points, int8 weights, filter scales, int32 biases. The first difference raises
  ``FileMismatchError`` naming the tensor;
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


_STEP_THROUGH = ("QUANTIZE", "RESHAPE")  # file ops that move or requantize a tensor: no twin op of their own


def first_difference(integer_model, path):
    """The first place where ``integer_model`` (from ``mobileqat.lower``) and the .tflite differ, as
    text naming the file's tensor and the twin's layer, or None when they hold the same graph.

    Ops are matched by the graph, not by position: the converter orders branches its own way. Each
    twin op (kinds in ``TFLITE_OPS``, in twin order) is matched with the file op that takes the same
    tensors; QUANTIZE (int8 -> int8 requantize) and RESHAPE in the file, and the twin's
    "requantize", "reshape" and "identity", pass their input through. "op i" counts the file's ops
    (int8 outputs, QUANTIZE/RESHAPE and shape arithmetic left out)."""
    return _match(integer_model, path)[1]


def file_tensors(integer_model, path):
    """{twin tensor name: index of the file's tensor that holds it} for every op of ``integer_model``
    with a TFLite op (see ``first_difference``); raises ValueError with the first difference."""
    mapped, why = _match(integer_model, path)
    if why:
        raise ValueError(f"{path} does not hold the integer model's graph: {why}")
    return mapped


def _match(integer_model, path):
    """(twin tensor name -> file tensor index as far as matched, the first difference or None)."""
    from mobileqat.lowering import TFLITE_OPS
    it, tensors, ops = _file_graph(path)
    graph_in = int(it.get_input_details()[0]["index"])
    activations, alias, file_ops = {graph_in}, {}, []
    for op in ops:
        ins = [int(i) for i in op["inputs"] if int(i) >= 0]
        out = int(op["outputs"][0])
        if np.dtype(tensors[out]["dtype"]) not in (np.int8, np.uint8, np.int16):
            continue  # DEQUANTIZE at a float output, SHAPE / STRIDED_SLICE / PACK of a reshape's shape
        activations.add(out)
        if op["op_name"] == "QUANTIZE" and ins == [graph_in] and np.dtype(tensors[graph_in]["dtype"]) == np.float32:
            graph_in = out  # float input: the int8 graph starts at its QUANTIZE
        elif op["op_name"] in _STEP_THROUGH and ins:
            alias[out] = alias.get(ins[0], ins[0])
        else:
            file_ops.append(dict(op, ins=[alias.get(i, i) for i in ins if i in activations], out=out))
    twin_alias, twin_ops = {}, []
    for op in integer_model.ops:
        if op.kind in TFLITE_OPS:
            twin_ops.append(op)
        else:
            twin_alias[op.output] = twin_alias.get(op.inputs[0], op.inputs[0])
    if file_ops and integer_model.input is not None:
        why = _quantization_difference(tensors[graph_in], integer_model.input)
        if why:
            return {}, f"input tensor '{_short(tensors[graph_in]['name'])}': {why}"
    mapped = {integer_model.input.name: graph_in}
    matched = set()
    counts = f"(file: {len(file_ops)} ops, model: {len(twin_ops)})"
    for lop in twin_ops:
        want = [mapped.get(twin_alias.get(n, n)) for n in lop.inputs]
        candidates = [i for i, fop in enumerate(file_ops) if i not in matched and fop["ins"] == want]
        if lop.kind == "pad" and want[0] is not None and all(file_ops[i]["op_name"] != "PAD" for i in candidates):
            # the converter folds a PAD into the CONV_2D / DEPTHWISE_CONV_2D after it when the padding is the
            # conv's SAME padding: that conv then reads the PAD's input (the PAD keeps its input's scale)
            twin_alias[lop.output] = twin_alias.get(lop.inputs[0], lop.inputs[0])
            continue
        if not candidates:
            rest = [i for i in range(len(file_ops)) if i not in matched]
            if not rest:
                return mapped, (f"op {len(file_ops)}: the model has {lop.kind} (layer '{lop.output}') "
                                f"where the other has none {counts}")
            return mapped, (f"op {rest[0]}: the file has {file_ops[rest[0]]['op_name']} where the model has "
                            f"{TFLITE_OPS[lop.kind]} (layer '{lop.output}')")
        whys = [_op_difference(it, tensors, file_ops[i], lop, integer_model, TFLITE_OPS) for i in candidates]
        best = next((i for i, why in zip(candidates, whys) if why is None), None)
        if best is None:
            same = [w for i, w in zip(candidates, whys) if file_ops[i]["op_name"] == TFLITE_OPS[lop.kind]]
            return mapped, (same[0] if same else f"op {candidates[0]}: {whys[0]}")
        matched.add(best)
        mapped[lop.output] = file_ops[best]["out"]
    rest = [i for i in range(len(file_ops)) if i not in matched]
    if rest:
        return mapped, f"op {rest[0]}: the file has {file_ops[rest[0]]['op_name']} where the other has none {counts}"
    return mapped, None


def _op_difference(it, tensors, fop, lop, integer_model, tflite_ops):
    """Why file op ``fop`` is not the twin's op ``lop`` (kind, output quantization, weights), or None."""
    if fop["op_name"] != tflite_ops[lop.kind]:
        return f"the file has {fop['op_name']} where the model has {tflite_ops[lop.kind]} (layer '{lop.output}')"
    t_out = tensors[fop["out"]]
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
            if in_file is None or in_model is None:  # an op without bias (TRANSPOSE_CONV writes none; the
                # converter drops a FULLY_CONNECTED bias of zeros): the same as a bias of zeros
                present = in_model if in_file is None else in_file
                if present is not None and not (what == "bias" and not np.any(present)):
                    return (f"layer '{lop.output}': the {'file' if in_model is None else 'model'} has a {what} "
                            "where the other has none")
                continue
            why = _array_difference(in_file, in_model)
            if why:
                tensor = t_b if what == "bias" else t_w
                return f"tensor '{_short(tensor['name'])}' ({what} of layer '{lop.output}'): {why}"
    return None


# TRANSPOSE_CONV's inputs are (output shape, weights, data, bias); other ops start with the data input.
_BIAS_INPUT = {"TRANSPOSE_CONV": 3}  # file ops whose bias is not input 2 (TRANSPOSE_CONV: shape, weights, data, bias)


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
