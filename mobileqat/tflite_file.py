"""Named metadata entries of a .tflite flatbuffer (``Model.metadata``): read and add. No TensorFlow.

The runtimes ignore metadata they do not know, so an entry changes nothing in how a file runs.
mobileqat writes ``mobileqat_fingerprint`` (JSON) at export: which model the file came from.
"""
import os

import numpy as np

from ai_edge_litert.tools import flatbuffer_utils
from ai_edge_litert import schema_py_generated as schema


def _root(model):
    """A .tflite path or its bytes -> (bytes, schema.Model). Raises ValueError on a non-TFLite file."""
    data = model if isinstance(model, (bytes, bytearray)) else open(os.fspath(model), "rb").read()
    if len(data) < 8 or data[4:8] != b"TFL3":
        where = "the data" if isinstance(model, (bytes, bytearray)) else os.fspath(model)
        raise ValueError(f"{where} is not a .tflite flatbuffer (no 'TFL3' identifier).")
    return bytes(data), schema.Model.GetRootAs(data, 0)


def read_metadata(model):
    """{name: bytes} of every metadata entry of a .tflite (path or bytes). Raises ValueError when
    the file is not a TFLite flatbuffer or an entry points outside the file."""
    data, root = _root(model)
    out = {}
    try:
        for i in range(root.MetadataLength()):
            entry = root.Metadata(i)
            buffer = root.Buffers(entry.Buffer())
            if buffer.Offset() > 1:  # stored after the flatbuffer (files over 2 GB)
                value = data[buffer.Offset():buffer.Offset() + buffer.Size()]
            else:
                value = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
            out[entry.Name().decode("utf-8", "replace")] = value
    except Exception as e:  # noqa: BLE001 - a damaged table surfaces as any IndexError/struct error
        raise ValueError(f"the metadata of the .tflite is damaged ({type(e).__name__}: {e}).") from e
    return out


def with_metadata(model_bytes, entries):
    """The .tflite bytes with metadata ``entries`` {name: bytes} added (an existing entry of the
    same name is replaced). Operators, tensors and weights are carried over unchanged."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    model.metadata = [m for m in (model.metadata or []) if m.name.decode("utf-8", "replace") not in entries]
    for name, value in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(bytes(value), np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name.encode(), len(model.buffers) - 1
        model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# operators whose third input is a bias, in TFLite's int16x8 kernels
_BIAS_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def int64_biases(model_bytes):
    """The .tflite bytes with every int32 bias of an int16x8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED
    (int16 input) widened to int64, values and scales unchanged; other ops untouched.

    TF 2.21's converter writes int32 biases from a 16-bit QAT graph (its PTQ path writes int64); the
    int16 DEPTHWISE_CONV_2D kernel refuses them ("bias->type != kTfLiteInt64"). The int16x8 kernels
    accumulate in int64 either way, so the widened file computes what the converter meant. Returns
    (bytes, number of tensors widened)."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    done = 0
    for sub in model.subgraphs:
        widened = set()
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) not in _BIAS_OPS or len(op.inputs) < 3:
                continue
            x, b = op.inputs[0], op.inputs[2]
            if b < 0 or b in widened or sub.tensors[x].type != schema.TensorType.INT16:
                continue
            t = sub.tensors[b]
            if t.type != schema.TensorType.INT32:
                continue
            buffer = model.buffers[t.buffer]
            values = np.frombuffer(bytes(buffer.data), np.int32).astype("<i8")
            buffer.data = np.frombuffer(values.tobytes(), np.uint8)
            t.type = schema.TensorType.INT64
            widened.add(b)
            done += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), done
