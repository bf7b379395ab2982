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
IO_TYPES = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}


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
    io_type: "int8" or "uint8" for the integer kinds (input/output tensors), "float32" otherwise.
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
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif not _has_fake_quant(model):
        raise ValueError(f"model '{model.name}' has no fake-quant layers; qat_int8 export takes a model "
                         "from mobileqat.quantize(...). For a float model use kind='ptq_int8'.")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = IO_TYPES[io_type]
    converter.inference_output_type = IO_TYPES[io_type]
    return converter.convert()


def _has_fake_quant(model):
    return any(type(layer).__name__ in ("QuantizeWrapperV2", "QuantizeWrapper", "QuantizeLayer")
               for layer in model.layers)


def export_tflite(model, path, kind="qat_int8", representative_data=None, io_type=None, allow_float_ops=False):
    """Convert ``model`` and write it to ``path`` atomically. Returns the file size in bytes.

    io_type defaults to "float32" for kind="float" and "int8" otherwise. The file's metadata records
    the model's fingerprint (``mobileqat.provenance``), so ``validate`` and ``debug`` can tell
    cheaply whether a file belongs to the model they are given. An integer kind that leaves float ops
    raises ValueError, unless ``allow_float_ops`` (layers kept float by ``quantize(keep_float=...)``).
    """
    io_type = io_type or ("float32" if kind == "float" else "int8")
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
