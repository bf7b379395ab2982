"""XNNPACK latency of tf_keras EfficientNetB0's squeeze-excite with and without ``pool_reshape_to_keepdims``.

    python models/bench_se_keepdims.py [--size 224] [--runs 50] [--out se_keepdims.json]

EfficientNetB0 (weights=None, 10 classes) quantized twice by ``mobileqat.quantize``: with every rewrite, and with
``pool_reshape_to_keepdims`` left out (its 16 squeeze-excite blocks keep GlobalAveragePooling2D + Reshape, which
the converter writes with batch-dependent SHAPE / STRIDED_SLICE / PACK / RESHAPE). Ranges from one forward pass
on 4 random images (latency and delegation do not depend on training). Per file: ops XNNPACK takes, the ops left
to the builtin kernels; then both files timed in one worker, invokes interleaved (``harness.benchmark_pair``,
1 thread, batch 1): medians and the median per-pair ratio.
"""
import argparse
import importlib
import json
import os
import tempfile

import numpy as np

from mobileqat import export, harness, runtime
from mobileqat._tf import keras


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="se_keepdims.json")
    args = p.parse_args()
    Q = importlib.import_module("mobileqat.quantize")
    keras.utils.set_random_seed(0)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(args.size, args.size, 3), classes=10)
    x = np.random.default_rng(0).uniform(0, 255, (4, args.size, args.size, 3)).astype(np.float32)
    folder, paths, rows = tempfile.mkdtemp(), {}, {}
    everything = Q.REWRITES
    for name, rewrites in (("without", tuple(r for r in everything if r.__name__ != "pool_reshape_to_keepdims")),
                           ("with", everything)):
        Q.REWRITES = rewrites
        try:
            qat = Q.quantize(model)
        finally:
            Q.REWRITES = everything
        qat(x, training=True)
        paths[name] = os.path.join(folder, f"{name}.tflite")
        export.export_tflite(qat, paths[name])
        cover, error = runtime.run_isolated(runtime.xnnpack_coverage, paths[name], timeout=1200)
        rows[name] = {"bytes": os.path.getsize(paths[name]), "xnnpack_coverage": cover, "error": error}
        print(name, json.dumps(rows[name]), flush=True)
    pair = harness.benchmark_pair(paths["without"], paths["with"], runtimes=("xnnpack",), runs=args.runs)
    result = {"model": f"EfficientNetB0 {args.size}x{args.size}x3, 10 classes", "files": rows,
              "latency_without_vs_with": pair["rows"], "errors": pair["errors"]}
    print(json.dumps(result["latency_without_vs_with"], indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
