"""W8A16 (TFLite int16x8) against W8A8 on one trained model: accuracy, bytes, gzip bytes, latency, twin fidelity.

    python models/bench_w8a16.py [--model mobilenet_v2] [--alpha 0.35] [--train 3000] [--out w8a16.json]

One float MobileNet trained on the built-in synthetic shapes (32x32x3), then quantized twice from the same
float weights ("w8a8", "w8a16"), each fine-tuned for the same QAT epochs and exported. Accuracy is measured
by the TFLite runtimes on the held-out split; latency by ``harness.benchmark_pair`` (both files in one
worker, invokes interleaved, 1 thread); fidelity: the integer twin (``mobileqat.lower``) against each file,
output code by output code, on the test split.
"""
import argparse
import json
import time

import numpy as np

import mobileqat as mq
from mobileqat import export, harness, lowering
from mobileqat.runtime import TFLiteModel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", default="w8a16.json")
    args = p.parse_args()
    from mobileqat._tf import keras
    keras.utils.set_random_seed(0)
    ds = mq.synthetic_shapes(n_train=args.train, n_test=args.test)
    model = mq.architectures.build(args.model, ds.input_shape, ds.classes, alpha=args.alpha)
    mq.fit(model, ds.x_train, ds.y_train, epochs=args.epochs)
    rows, paths = {}, {}
    for scheme in ("w8a8", "w8a16"):
        keras.utils.set_random_seed(1)
        qat = mq.quantize(model, scheme)
        t = time.perf_counter()
        mq.fit(qat, ds.x_train, ds.y_train, epochs=args.qat_epochs, learning_rate=2e-4)
        qat_s = time.perf_counter() - t
        path = paths[scheme] = f"/tmp/bench_{scheme}.tflite"
        export.export_tflite(qat, path)
        twin = lowering.lower(qat)
        row = {**export.weight_summary(path), "qat_fit_s": round(qat_s, 1), **export.tensor_types(path)}
        for runtime in ("xnnpack", "reference"):
            m = TFLiteModel(path, runtime)
            codes = m.quantize_input(ds.x_test)
            out = np.concatenate([m.invoke_raw(codes[i:i + 50]) for i in range(0, len(codes), 50)])
            mine = twin.run(codes, runtime)
            row[f"accuracy_{runtime}"] = float((out.argmax(1) == ds.y_test).mean())
            row[f"twin_max_lsb_{runtime}"] = int(np.abs(out.astype(np.int64) - mine).max())
        rows[scheme] = row
        print(scheme, json.dumps(row), flush=True)
    bench = {rt: harness.benchmark_pair(paths["w8a8"], paths["w8a16"], runtimes=(rt,), runs=args.runs)
             for rt in ("xnnpack", "reference")}
    result = {"model": f"{args.model} alpha {args.alpha} 32x32x3, 10 classes, {args.train} train / {args.test} "
                       f"test synthetic shapes, {args.epochs} float + {args.qat_epochs} QAT epochs",
              "rows": rows, "latency_pair_w8a8_vs_w8a16": {rt: b["rows"] for rt, b in bench.items()}}
    print(json.dumps(result["latency_pair_w8a8_vs_w8a16"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
