"""Folded batch norm in QAT: two-pass (Krishnamoorthi) vs single-conv (PyTorch's _forward_approximate) folding,
and the step after the batch-norm freeze, on the demo data (synthetic shapes, MobileNetV2-0.35, 32x32).

    python models/bench_bn_folding.py [--epochs 10] [--qat-epochs 3] [--out bn_folding.json]

One float training (Adam 2e-3, cosine), then one QAT fine-tune per folding from that float model (Adam 2e-4,
10 % warm-up, cosine), each freezing batch norm at the start of its last epoch. Reported per folding: median
training step before the freeze and after it (``training.StepTimer``, both in seconds and over the float model's
median step), and int8 accuracy of the exported file on XNNPACK (held-out split).
"""
import argparse
import json
import os
import tempfile

import numpy as np

from mobileqat import architectures, export, harness, training
from mobileqat.data import synthetic_shapes
from mobileqat.quantize import quantize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--out", default="bn_folding.json")
    args = p.parse_args()
    ds = synthetic_shapes()
    model = architectures.build("mobilenet_v2", ds.input_shape, ds.classes, alpha=0.35)
    fl = training.fit(model, ds.x_train, ds.y_train, args.epochs, 64, 2e-3, seed=0, verbose=2)
    steps_per_epoch = int(np.ceil(len(ds.x_train) / 64))
    freeze_at = steps_per_epoch * (args.qat_epochs - 1)
    rows = {"float": {"step_s": fl["step_s"]}}
    folder = tempfile.mkdtemp()
    for folding in ("two_pass", "single_conv"):
        qat = training.set_bn_folding(quantize(model), folding)
        timer = training.StepTimer()
        training.fit(qat, ds.x_train, ds.y_train, args.qat_epochs, 64, 2e-4, seed=1, verbose=2, warmup=0.1,
                     callbacks=[timer, training.FreezeBatchNorm(freeze_at)])
        before, after = timer.times[3:freeze_at], timer.times[freeze_at + 3:]
        path = os.path.join(folder, f"{folding}.tflite")
        export.export_tflite(qat, path)
        val = harness.validate(path, ds.x_test, ds.y_test, runtimes=("xnnpack",))
        row = {"step_s_before_freeze": float(np.median(before)), "step_s_after_freeze": float(np.median(after)),
               "accuracy_xnnpack": val["runtimes"]["xnnpack"].get("accuracy"),
               "keras_sim_accuracy": float(np.mean(qat.predict(ds.x_test, verbose=0).argmax(-1) == ds.y_test))}
        row["ratio_before_freeze"] = row["step_s_before_freeze"] / fl["step_s"]
        row["ratio_after_freeze"] = row["step_s_after_freeze"] / fl["step_s"]
        rows[folding] = row
        print(folding, json.dumps(row), flush=True)
    rows["float"]["accuracy_xnnpack"] = None
    fpath = os.path.join(folder, "float.tflite")
    export.export_tflite(model, fpath, "float")
    rows["float"]["accuracy_xnnpack"] = harness.validate(fpath, ds.x_test, ds.y_test,
                                                         runtimes=("xnnpack",))["runtimes"]["xnnpack"].get("accuracy")
    rows["setup"] = {"epochs": args.epochs, "qat_epochs": args.qat_epochs, "freeze_step": freeze_at,
                     "steps_per_epoch": steps_per_epoch}
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
