"""Per-layer sensitivity (W8A8 -> W4A8, one layer at a time) and mixed-precision plans on the demo data, measured
on the integer twin; the plans' files against all-W8A8 and all-W4A8 PTQ.

    PYTHONPATH=. .venv/bin/python models/bench_sensitivity.py [--budgets 0.5 2] [--out /tmp/bench_sensitivity]

The float model and data are those of ``models/bench_ptq.py`` (MobileNetV2-0.35, 32x32x3 synthetic shapes, 8,000
train / 1,000 test, 6 epochs, learning rate 2e-3, seed 0; reused from ``--float-model`` or OUT when present),
256 calibration images (``calibration_subset``), min-max PTQ (``mobileqat.ptq``). Sensitivity and plans on the
XNNPACK twin over the 1,000 test images (``mobileqat.sensitivity``); then every variant (all W8A8, all W4A8, each
plan) is exported and its accuracy measured by the TFLite file on XNNPACK (1 thread), with its bytes, gzip bytes,
the weight bytes at their bit widths (weights x bits / 8: what a packed store holds) and the file's max LSB from
the twin. Writes OUT/bench_sensitivity.json, OUT/sensitivity.png (the first budget's plan) and prints tables.
"""
import argparse
import json
import os
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--high", default="w8a8")
    p.add_argument("--low", default="w4a8")
    p.add_argument("--float-model", default=None, help="a trained float .keras (default: OUT/float_*.keras, or train)")
    p.add_argument("--reuse-sensitivity", action="store_true", help="take the per-layer numbers from "
                   "OUT/sensitivity_layers.json of an earlier run (same model, data and schemes)")
    p.add_argument("--out", default="/tmp/bench_sensitivity")
    args = p.parse_args(argv)

    import mobileqat as mq
    from mobileqat import export
    from mobileqat import sensitivity as S
    from mobileqat._tf import keras
    from mobileqat.runtime import TFLiteModel
    os.makedirs(args.out, exist_ok=True)
    ds = mq.synthetic_shapes(n_train=args.train, n_test=args.test)
    saved = args.float_model or os.path.join(args.out, f"float_{args.train}_{args.epochs}_0.002.keras")
    if os.path.exists(saved):
        model = keras.models.load_model(saved)
    else:
        keras.utils.set_random_seed(0)
        model = mq.architectures.mobilenet_v2(ds.input_shape, ds.classes, alpha=0.35)
        mq.fit(model, ds.x_train, ds.y_train, epochs=args.epochs, learning_rate=2e-3, verbose=0)
        export.save_keras_model(model, saved)
    calib = mq.calibration_subset(ds, args.calibration)
    x, y = ds.x_test, ds.y_test
    float_acc = float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))

    t = time.time()
    run = S.SensitivityRun(model, calib, x, y, args.high, args.low, log=lambda m: print(m, flush=True))
    t_base = time.time() - t
    t = time.time()
    sens_path = os.path.join(args.out, "sensitivity_layers.json")
    if args.reuse_sensitivity and os.path.exists(sens_path):
        with open(sens_path) as f:
            sens = json.load(f)
    else:
        sens = S.layer_sensitivity(run)
        S.write_json(sens, sens_path)  # kept: --reuse-sensitivity plans again without measuring every layer
    t_layers = time.time() - t
    plans = {}
    for budget in args.budgets:
        t = time.time()
        plans[budget] = S.mixed_precision_plan(sens, budget, run)
        plans[budget]["seconds"] = round(time.time() - t, 1)
    print(S.format_table(sens, plans[args.budgets[0]], top=12))
    S.plot_sensitivity(sens, os.path.join(args.out, "sensitivity.png"), plans[args.budgets[0]])

    counts = {r["name"]: r["weights"] for r in sens["layers"]}
    high_bits, low_bits = run.high.weight_bits, run.low.weight_bits

    def variant(name, scheme, low_layers):
        t = time.time()
        qat = mq.ptq(model, calib, scheme)
        path = os.path.join(args.out, f"{name}.tflite")
        export.export_tflite(qat, path)
        codes = np.asarray(TFLiteModel(path, "xnnpack").predict(x))
        twin = run._codes(qat)
        summary = export.weight_summary(path)
        packed = sum(c * (low_bits if n in low_layers else high_bits) for n, c in counts.items()) // 8
        row = {"variant": name, "low_layers": len(low_layers), "accuracy": run._accuracy(codes),
               "twin_accuracy": run._accuracy(twin), "max_lsb_vs_twin": int(np.abs(codes.astype(int) - twin).max()),
               "bytes": summary["bytes"], "gzip_bytes": summary["gzip_bytes"], "weight_bytes_at_bits": packed,
               "grids": summary["grids"], "seconds": round(time.time() - t, 1)}
        print(json.dumps(row), flush=True)
        return row

    names = [r["name"] for r in sens["layers"]]
    rows = [variant("all_" + str(args.high), args.high, []), variant("all_" + str(args.low), args.low, names)]
    for budget, plan in plans.items():
        rows.append(variant(f"plan_{budget:g}", plan["rules"], plan["low_layers"]))
    result = {"args": vars(args), "float_accuracy": float_acc, "seconds": {"baseline": round(t_base, 1),
              "layers": round(t_layers, 1)}, "sensitivity": sens,
              "plans": {str(b): p for b, p in plans.items()}, "files": rows}
    with open(os.path.join(args.out, "bench_sensitivity.json"), "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nfloat (Keras): {100 * float_acc:.1f} %; baseline {args.high} on the twin: "
          f"{100 * sens['baseline']['accuracy']:.1f} %; {len(names)} layers in {t_layers:.0f} s "
          f"({sens['reuse'].split(':')[0]})")
    print("\n| variant | layers at " + str(args.low) + " | accuracy (XNNPACK file) | vs all " + str(args.high)
          + " (points) | planned drop: predicted / twin | bytes | gzip bytes | weight bytes at their bits | "
            "file vs twin (LSB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0]["accuracy"]
    for r in rows:
        plan = plans.get(float(r["variant"][5:])) if r["variant"].startswith("plan_") else None
        planned = (f"{plan['predicted_drop_points']:.1f} / {plan['measured']['drop_points']:.1f}" if plan else "")
        print(f"| {r['variant']} | {r['low_layers']} of {len(names)} | {100 * r['accuracy']:.1f} % | "
              f"{100 * (r['accuracy'] - base):+.1f} | {planned} | {r['bytes']:,} | {r['gzip_bytes']:,} | "
              f"{r['weight_bytes_at_bits']:,} | {r['max_lsb_vs_twin']} |")


if __name__ == "__main__":
    main()
