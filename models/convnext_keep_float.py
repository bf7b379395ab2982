"""ConvNeXtTiny (weights=None, 32x32, 10 classes) with its LayerNormalization kept float (quantize writes them as
int8 ops otherwise): quantize(keep_float=[their names]),
one epoch on 32 random images (as ``mobileqat coverage`` does), export with allow_float_ops=True, validate on both
runtimes against the float simulation (there is no integer twin for a file with float ops).

Usage: python models/convnext_keep_float.py [OUT]    (writes OUT.tflite and OUT.json)
"""
import json
import sys
import time
import warnings

import numpy as np

import mobileqat as mq
from mobileqat import export, harness, transforms
from mobileqat._tf import keras
from mobileqat.runtime import xnnpack_coverage

OUT = sys.argv[1] if len(sys.argv) > 1 else "convnext_tiny_keep_float"
keras.utils.set_random_seed(0)
model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10)
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)
y = rng.integers(0, 10, 32)
t = time.time()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    flat = transforms.flatten_nested(model)  # the stem's LayerNormalization is in a nested Sequential
    qat = mq.quantize(model, keep_float=[la.name for la in flat.layers if type(la).__name__ == "LayerNormalization"])
qat.compile("adam", "sparse_categorical_crossentropy")
qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
out = {"quantize_fit_s": round(time.time() - t, 1)}
t = time.time()
n = export.export_tflite(qat, OUT + ".tflite", allow_float_ops=True)
types = export.tensor_types(OUT + ".tflite")
out.update(export_s=round(time.time() - t, 1), bytes=n, io=(types["input"], types["output"]),
           float_ops=len(types["float_ops"]), float_op_kinds=sorted(set(types["float_ops"])),
           xnnpack=xnnpack_coverage(OUT + ".tflite"))
result = harness.validate(OUT + ".tflite", x, y, model=qat)
out["validate"] = result["runtimes"]
out["integer_path_error"] = result.get("integer_path_error", "")[:200]
out["reference_vs_xnnpack"] = result.get("reference_vs_xnnpack")
print(json.dumps(out, indent=1, default=str))
with open(OUT + ".json", "w") as f:
    json.dump(out, f, indent=1, default=str)
