"""Post-training quantization on the demo data: the converter's PTQ against mobileqat.ptq (minmax / percentile /
mse ranges, with and without bias correction, nearest or AdaRound rounding) at W8A8 and W4A8.

    PYTHONPATH=. .venv/bin/python models/bench_ptq.py [--epochs 6] [--train 8000] [--out /tmp/bench_ptq]
    PYTHONPATH=. .venv/bin/python models/bench_ptq.py --methods minmax --rounding nearest adaround

``--rounding adaround`` adds ``mobileqat.ptq(..., adaround=True)`` rows (``--adaround-iters`` Adam steps per
layer on batches of ``--adaround-batch`` calibration images); their "adaround_s" is the time AdaRound took.

One float MobileNetV2-0.35 (32x32x3, synthetic shapes, ``--epochs`` epochs of ``mobileqat.fit``), one
calibration subset (``--calibration`` images of the training split, ``mobileqat.calibration_subset``), every
variant exported as a full-integer int8 file; accuracy on the held-out test split measured by the TFLite
runtime (XNNPACK, 1 thread). Every mobileqat variant is also checked against its integer twin
(``mobileqat.lower``) on the first ``--twin-images`` test images on the reference kernels and XNNPACK
(max |LSB| difference of the output codes). Prints a markdown table and writes OUT/bench_ptq.json.
"""
import argparse
import json
import os
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--twin-images", type=int, default=64)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--schemes", nargs="+", default=["w8a8", "w4a8"])
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile", "mse"])
    p.add_argument("--rounding", nargs="+", default=["nearest"], choices=["nearest", "adaround"])
    p.add_argument("--adaround-iters", type=int, default=1000)
    p.add_argument("--adaround-batch", type=int, default=32)
    p.add_argument("--no-baselines", action="store_true", help="skip the float and converter PTQ files")
    p.add_argument("--append", action="store_true", help="add rows to OUT/bench_ptq.json instead of replacing it")
    p.add_argument("--out", default="/tmp/bench_ptq")
    args = p.parse_args(argv)

    import mobileqat as mq
    from mobileqat import export, lowering
    from mobileqat.runtime import TFLiteModel
    os.makedirs(args.out, exist_ok=True)
    ds = mq.synthetic_shapes(n_train=args.train, n_test=args.test)
    from mobileqat._tf import keras
    saved = os.path.join(args.out, f"float_{args.train}_{args.epochs}_{args.learning_rate}.keras")
    if os.path.exists(saved):  # a rerun measures the same float model
        model = keras.models.load_model(saved)
    else:
        keras.utils.set_random_seed(0)
        model = mq.architectures.mobilenet_v2(ds.input_shape, ds.classes, alpha=0.35)
        t0 = time.time()
        mq.fit(model, ds.x_train, ds.y_train, epochs=args.epochs, learning_rate=args.learning_rate, verbose=0)
        print(f"float training: {time.time() - t0:.0f} s", flush=True)
        export.save_keras_model(model, saved)
    calib = mq.calibration_subset(ds, args.calibration)

    def accuracy(path):
        probs = TFLiteModel(path, "xnnpack").predict(ds.x_test)
        return float(np.mean(np.argmax(probs, -1) == ds.y_test))

    json_path = os.path.join(args.out, "bench_ptq.json")
    rows = json.load(open(json_path))["rows"] if args.append and os.path.exists(json_path) else []

    def add(name, scheme, path, seconds, extra=None):
        row = {"variant": name, "scheme": scheme, "accuracy": accuracy(path), "bytes": os.path.getsize(path),
               "seconds": round(seconds, 1), **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(json_path, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)

    if not args.no_baselines:
        t = time.time()
        path = os.path.join(args.out, "float.tflite")
        export.export_tflite(model, path, "float")
        add("float", "-", path, time.time() - t)
        t = time.time()
        path = os.path.join(args.out, "converter_ptq_w8a8.tflite")
        export.export_tflite(model, path, "ptq_int8", calib)
        add("converter PTQ (min-max)", "w8a8", path, time.time() - t)

    for scheme in args.schemes:
        for method in args.methods:
            for rounding in args.rounding:
                for bc in (False, True):
                    t = time.time()
                    extra = {}
                    if rounding == "nearest":
                        qat = mq.ptq(model, calib, scheme, method=method, bias_correction=bc,
                                     percentile=args.percentile)
                    else:  # = mq.ptq(..., adaround=True), with AdaRound's report; bias correction after AdaRound
                        qat = mq.ptq(model, calib, scheme, method=method, percentile=args.percentile)
                        report = mq.adaround(qat, calib, iters=args.adaround_iters, batch_size=args.adaround_batch,
                                             bias_correction=bc)
                        extra = {"adaround_s": report["seconds"], "adaround_iters": args.adaround_iters,
                                 "changed": round(float(np.mean([e["changed"] for e in report["adaround"].values()])), 4),
                                 "mse_ratio_median": round(float(np.median(
                                     [e["mse_adaround"] / max(e["mse_nearest"], 1e-30)
                                      for e in report["adaround"].values()])), 4)}
                    suffix = ("_adaround" if rounding == "adaround" else "") + ("_bc" if bc else "")
                    path = os.path.join(args.out, f"ptq_{scheme}_{method}{suffix}.tflite")
                    export.export_tflite(qat, path)
                    seconds = time.time() - t
                    twin = lowering.lower(qat)
                    lsb = {}
                    for runtime in ("reference", "xnnpack"):
                        f = TFLiteModel(path, runtime)
                        codes = f.quantize_input(ds.x_test[:args.twin_images])
                        out = np.concatenate([f.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
                        lsb[runtime] = int(np.abs(out.astype(int) - twin.run(codes, runtime).astype(int)).max())
                    name = f"mobileqat PTQ {method}" + (" + AdaRound" if rounding == "adaround" else "") \
                        + (" + bias corr." if bc else "")
                    add(name, scheme, path, seconds, {"twin_max_lsb": lsb, **extra})

    float_acc = [r for r in rows if r["variant"] == "float"][0]["accuracy"]
    print("\n| variant | scheme | accuracy (XNNPACK) | vs float (points) | bytes | twin max LSB ref / XNNPACK "
          "| AdaRound s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lsb = r.get("twin_max_lsb")
        lsb = f"{lsb['reference']} / {lsb['xnnpack']}" if lsb else ""
        print(f"| {r['variant']} | {r['scheme']} | {100 * r['accuracy']:.1f} % | "
              f"{100 * (r['accuracy'] - float_acc):+.1f} | {r['bytes']:,} | {lsb} | {r.get('adaround_s', '')} |")


if __name__ == "__main__":
    main()
