"""mobileqat: quantization-aware training for Keras (tf-keras) to full-integer TFLite, verified.

    import mobileqat as mq
    model = mq.architectures.mobilenet_v2((32, 32, 3), classes=10, alpha=0.35)
    qat = mq.quantize(model, "w8a8")              # folded BN, per-channel int8 weights
    qat.compile(...); qat.fit(...)
    mq.export_tflite(qat, "model.tflite")         # full-integer, int8 I/O
    mq.validate("model.tflite", x_test, y_test, model=qat)
    mq.lower(qat).predict(x_test, "xnnpack")     # the deployed file's outputs, integer-exact, in Python

Importing mobileqat selects Keras 2 (TF_USE_LEGACY_KERAS=1). TensorFlow itself is imported
lazily, on first use of an API that needs it, so ``mobileqat.runtime`` works without it.
"""
import importlib
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
if "tensorflow" in sys.modules:  # TensorFlow came first: check now that it uses Keras 2
    importlib.import_module("mobileqat._tf")

__version__ = "0.1.0"

_API = {
    "quantize": "mobileqat.quantize", "quantize_scope": "mobileqat.quantize",
    "QuantScheme": "mobileqat.schemes", "get_scheme": "mobileqat.schemes",
    "SchemeRules": "mobileqat.schemes", "load_rules": "mobileqat.schemes", "scheme_plan": "mobileqat.quantize",
    "FoldedConvBN": "mobileqat.layers", "QuantizeConfig": "mobileqat.layers", "LayerNormCore": "mobileqat.layers",
    "WeightQuantizer": "mobileqat.quantizers", "ActivationQuantizer": "mobileqat.quantizers",
    "FixedRangeQuantizer": "mobileqat.quantizers", "SymmetricActivationQuantizer": "mobileqat.quantizers",
    "LSQWeightQuantizer": "mobileqat.quantizers",
    "LSQActivationQuantizer": "mobileqat.quantizers", "PACTQuantizer": "mobileqat.quantizers",
    "fold_batchnorm": "mobileqat.transforms",
    "export_tflite": "mobileqat.export",
    "debug_fidelity": "mobileqat.debug",
    "lower": "mobileqat.lowering", "IntegerModel": "mobileqat.lowering",
    "validate": "mobileqat.harness", "benchmark": "mobileqat.harness",
    "Dataset": "mobileqat.data", "synthetic_shapes": "mobileqat.data", "load_image_folder": "mobileqat.data",
    "calibration_subset": "mobileqat.data", "image_folder_stream": "mobileqat.data",
    "ImageFolderStream": "mobileqat.data", "load_model_file": "mobileqat.pipeline",
    "fit": "mobileqat.training", "ptq": "mobileqat.calibration", "calibrate": "mobileqat.calibration",
    "adaround": "mobileqat.learned_rounding", "auto": "mobileqat.ladder", "LadderConfig": "mobileqat.ladder",
    "Distiller": "mobileqat.training", "QuantizationDelay": "mobileqat.training",
    "FreezeBatchNorm": "mobileqat.training", "BitSchedule": "mobileqat.training", "set_bn_folding": "mobileqat.training",
    "run_pipeline": "mobileqat.pipeline", "RunConfig": "mobileqat.pipeline", "load_qat_model": "mobileqat.quantize",
    "save_keras_model": "mobileqat.export",
    "audit": "mobileqat.quantize", "FileMismatchError": "mobileqat.provenance", "fingerprint": "mobileqat.provenance",
    "write_package": "mobileqat.package", "export_package": "mobileqat.package",
    "SensitivityRun": "mobileqat.sensitivity", "layer_sensitivity": "mobileqat.sensitivity",
    "mixed_precision_plan": "mobileqat.sensitivity", "plot_sensitivity": "mobileqat.sensitivity",
    "write_sensitivity": "mobileqat.sensitivity",
    "check_tflite": "mobileqat.runtime", "InvalidModelError": "mobileqat.runtime", "RuntimeFailure": "mobileqat.runtime",
}
_SUBMODULES = {"ladder", "architectures", "calibration", "compare", "learned_rounding", "ops", "data", "debug", "integer", "integer_xnnpack", "lowering", "export", "harness", "layers", "quantizers", "quantize", "schemes",
               "transforms", "training", "pipeline", "report", "runtime", "cli", "provenance", "stages",
               "tflite_file", "faults", "package", "device_check", "sensitivity"}

__all__ = sorted(_API) + ["architectures", "debug", "integer", "integer_xnnpack", "lowering"]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        _unshadow()
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mobileqat.{name}")
    raise AttributeError(f"module 'mobileqat' has no attribute {name!r}")


def _unshadow():
    """Importing the submodule mobileqat.quantize sets the package attribute ``quantize`` to the module;
    drop such attributes so that ``mobileqat.quantize`` stays the function (looked up again here)."""
    for api in ("quantize",):
        if isinstance(globals().get(api), type(sys)):
            del globals()[api]
