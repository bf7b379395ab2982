"""TFLite export: float, post-training-quantized int8 (PTQ) and QAT int8, full-integer I/O.

Every file is written atomically (temporary file in the same folder, then rename): a failed
conversion leaves no .tflite behind.
"""
import os
import tempfile

import numpy as np

from mobileqat import faults, provenance, tflite_file
from mobileqat._tf import tf

KINDS = ("float", "ptq_int8", "qat_int8")
IO_TYPES = {"int8": tf.int8, "uint8": tf.uint8, "int16": tf.int16, "float32": tf.float32}


def write_atomic(path, data):
    """Write bytes to ``path`` via a temporary file and rename; returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("write", os.path.basename(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_keras_model(model, path):
    """``model.save`` (format from the suffix, e.g. .keras) to a temporary name, then rename."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), ".tmp-" + os.path.basename(path))
    try:
        model.save(tmp)
        faults.point("write", os.path.basename(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def convert(model, kind="qat_int8", representative_data=None, io_type="int8", calibration_steps=None):
    """Convert a Keras model to .tflite bytes.

    kind: "float" (float32 file), "ptq_int8" (converter's int8 PTQ; needs ``representative_data``,
      float images (N, H, W, C) as the model takes them) or "qat_int8" (a model from
      ``mobileqat.quantize``: ranges come from its fake-quant ops, no calibration).
    io_type: "int8" or "uint8" for the integer kinds (input/output tensors), "float32" otherwise;
      "int16" for int16x8 files (16-bit activations, 8-bit weights): a QAT model of scheme "w8a16", or
      the converter's int16x8 PTQ of a float model (kind "ptq_int8", io_type "int16").
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {KINDS}.")
    if io_type not in IO_TYPES:
        raise ValueError(f"io_type={io_type!r}: use one of {sorted(IO_TYPES)}.")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "float":
        if io_type != "float32":
            raise ValueError(f"a float model has float32 input/output, not {io_type}; use io_type='float32'.")
        return converter.convert()
    if kind == "ptq_int8":
        if representative_data is None or len(representative_data) == 0:
            raise ValueError("ptq_int8 needs representative_data: float images (N, H, W, C), "
                             "e.g. mobileqat.data.calibration_subset(dataset).")
        samples = np.asarray(representative_data, np.float32)[:calibration_steps]

        def representative():
            for x in samples:
                yield [x[None]]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 if io_type == "int16"
            else tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif not _has_fake_quant(model):
        raise ValueError(f"model '{model.name}' has no fake-quant layers; qat_int8 export takes a model "
                         "from mobileqat.quantize(...). For a float model use kind='ptq_int8'.")
    elif activation_bits(model) == 16:  # int16x8: int16 activations, int8 weights
        if io_type not in ("int16", "float32"):
            raise ValueError(f"model '{model.name}' has 16-bit activations (scheme 'w8a16'): its file has int16 "
                             f"input/output, not {io_type}; use io_type='int16' (or 'float32').")
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif io_type == "int16":
        raise ValueError(f"io_type='int16' is for models with 16-bit activations (scheme 'w8a16'); model "
                         f"'{model.name}' has 8-bit activations: use 'int8' or 'uint8'.")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = IO_TYPES[io_type]
    converter.inference_output_type = IO_TYPES[io_type]
    data = converter.convert()
    if io_type == "int16" or (kind == "qat_int8" and activation_bits(model) == 16):
        data, _ = tflite_file.int64_biases(data)  # what the int16 DEPTHWISE_CONV_2D kernel takes
    return data


def activation_bits(model):
    """16 for a QAT model whose input is fake-quantized at 16 bits (scheme 'w8a16'), else 8."""
    for layer in model.layers:
        if type(layer).__name__ == "QuantizeLayer" and getattr(layer.quantizer, "num_bits", 8) == 16:
            return 16
    return 8


def _has_fake_quant(model):
    return any(type(layer).__name__ in ("QuantizeWrapperV2", "QuantizeWrapper", "QuantizeLayer")
               for layer in model.layers)


def export_tflite(model, path, kind="qat_int8", representative_data=None, io_type=None, allow_float_ops=False):
    """Convert ``model`` and write it to ``path`` atomically. Returns the file size in bytes.

    io_type defaults to "float32" for kind="float", "int16" for a QAT model with 16-bit activations
    (scheme "w8a16": TFLite int16x8) and "int8" otherwise. The file's metadata records
    the model's fingerprint (``mobileqat.provenance``), so ``validate`` and ``debug`` can tell
    cheaply whether a file belongs to the model they are given. An integer kind that leaves float ops
    raises ValueError, unless ``allow_float_ops`` (layers kept float by ``quantize(keep_float=...)``).
    """
    io_type = io_type or ("float32" if kind == "float" else
                          "int16" if kind == "qat_int8" and activation_bits(model) == 16 else "int8")
    data = convert(model, kind, representative_data, io_type)
    if kind != "float":
        float_ops = tensor_types(data)["float_ops"]
        if float_ops and not allow_float_ops:
            raise ValueError(f"the {kind} conversion of '{model.name}' left float ops {sorted(set(float_ops))}; "
                             "the layers producing them lack fake-quant ranges (or were kept float by "
                             "quantize(keep_float=...): then pass allow_float_ops=True). Nothing was written to "
                             f"{os.fspath(path)}.")
    data = tflite_file.with_metadata(data, provenance.metadata_entry(model, kind))
    write_atomic(path, data)
    return len(data)


def tensor_types(model):
    """{'input': dtype name, 'output': dtype name, 'float_ops': [op names computing in float]}.

    model: a .tflite path or its bytes."""
    from ai_edge_litert.interpreter import Interpreter
    it = (Interpreter(model_content=bytes(model)) if isinstance(model, (bytes, bytearray))
          else Interpreter(model_path=os.fspath(model)))
    details = {t["index"]: t for t in it.get_tensor_details()}
    float_ops = []
    for op in it._get_ops_details():
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if any(details[i]["dtype"] == np.float32 for i in op["outputs"] if i in details):
            float_ops.append(op["op_name"])
    return {"input": np.dtype(it.get_input_details()[0]["dtype"]).name,
            "output": np.dtype(it.get_output_details()[0]["dtype"]).name,
            "float_ops": float_ops}


# weight operand of each op that has one (TFLite operator input index)
_WEIGHT_INPUT = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}


def weight_summary(model):
    """What a .tflite (path or bytes) carries, for reports: {"bytes", "gzip_bytes" (gzip level 9, what an
    app download roughly carries), "weight_tensors" (weight operands of CONV_2D, DEPTHWISE_CONV_2D,
    FULLY_CONNECTED, TRANSPOSE_CONV), "grids" {"<n>-bit in int8": count of int8 weight tensors whose codes
    all lie in [-(2^(n-1)-1), 2^(n-1)-1] and not in the (n-1)-bit range; "int4 packed": INT4 tensors;
    other types by name}}. A symmetric max|w| range puts some code of every 8-bit channel at +-127, so
    an 8-bit tensor counts as 8-bit; a b-bit tensor's codes reach +-(2^(b-1)-1)."""
    import gzip

    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
    data = bytes(model) if isinstance(model, (bytes, bytearray)) else open(os.fspath(model), "rb").read()
    root = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    grids, seen = {}, set()
    for g, sub in enumerate(root.subgraphs):
        for op in sub.operators:
            code = root.operatorCodes[op.opcodeIndex]
            name = ops.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if name not in _WEIGHT_INPUT or len(op.inputs) <= _WEIGHT_INPUT[name]:
                continue
            index = op.inputs[_WEIGHT_INPUT[name]]
            if index < 0 or (g, index) in seen:
                continue
            seen.add((g, index))
            tensor = sub.tensors[index]
            buffer = root.buffers[tensor.buffer].data if tensor.buffer < len(root.buffers) else None
            if buffer is None or len(buffer) == 0:
                continue  # not a constant (computed weights)
            kind = types.get(tensor.type, str(tensor.type))
            if kind == "INT8":
                peak = int(np.abs(np.frombuffer(bytes(buffer), np.int8).astype(np.int16)).max())
                bits = max(2, int(np.ceil(np.log2(peak + 1))) + 1)
                key = f"{bits}-bit in int8"
            elif kind == "INT4":
                key = "int4 packed"
            else:
                key = kind.lower()
            grids[key] = grids.get(key, 0) + 1
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0)),
            "weight_tensors": sum(grids.values()), "grids": dict(sorted(grids.items()))}
