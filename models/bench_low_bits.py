"""Bytes, gzip bytes, weight grids, XNNPACK latency and twin fidelity of W8A8, W4A8 and mixed files.

    python models/bench_low_bits.py [--size 96] [--classes 1000] [--alpha 1.0] [--out low_bits.json]

MobileNetV2 with untrained (random-initialised) weights: the ranges are set by one training-mode
forward pass on random images, no fine-tuning, so accuracy is not measured here (file sizes and
latency do not depend on it; gzip bytes depend on the weight distribution, which training changes).
"""
import argparse
import json
import time

import numpy as np

from mobileqat import architectures, export, harness
from mobileqat.quantize import quantize
from mobileqat.runtime import xnnpack_coverage

MIXED = {"default": "w4a8", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
                                      {"match": {"position": "last"}, "scheme": "w8a8"}]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", default="low_bits.json")
    args = p.parse_args()
    from mobileqat._tf import keras
    keras.utils.set_random_seed(0)
    model = architectures.build("mobilenet_v2", (args.size, args.size, 3), args.classes, alpha=args.alpha)
    x = np.random.default_rng(0).uniform(-1, 1, (16, args.size, args.size, 3)).astype(np.float32)
    rows = {}
    for name, scheme in (("w8a8", "w8a8"), ("w4a8", "w4a8"), ("mixed", MIXED)):
        qat = quantize(model, scheme)
        qat(x, training=True)
        path = f"/tmp/bench_low_bits_{name}.tflite"
        t = time.perf_counter()
        export.export_tflite(qat, path)
        convert_s = time.perf_counter() - t
        val = harness.validate(path, x[:4], model=qat)  # in worker processes: a runtime may abort
        lsb = {rt: r.get("max_lsb_diff", r.get("error")) for rt, r in val["runtimes"].items()}
        bench = harness.benchmark(path, runtimes=("xnnpack",), runs=args.runs)
        rows[name] = {"scheme": scheme, **export.weight_summary(path), "xnnpack_ops": xnnpack_coverage(path),
                      "latency_ms_xnnpack": bench["latency_ms"].get("xnnpack"), "twin_max_lsb_4_images": lsb, "integer_path_error": val.get("integer_path_error"),
                      "convert_s": round(convert_s, 1)}
        print(name, json.dumps(rows[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": f"mobilenet_v2 alpha {args.alpha} {args.size}x{args.size} {args.classes} classes",
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
