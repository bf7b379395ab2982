"""Baseline: the plain tfmot flow on the same float model and data as a mobileqat run.

    python models/compare_tfmot.py OUT [--data IMAGE_DIR --input-size N --channels C]

Loads OUT/float_model.keras (written by `mobileqat demo/run`), quantizes it with
tfmot.quantization.keras.quantize_model (tfmot's own BN handling, per-tensor depthwise weights,
its default quantizers), fine-tunes it with the same epochs/learning rate as the run (OUT/report.json
config), exports a full-integer .tflite and measures the same fidelity numbers as mobileqat's report.
Writes OUT/tfmot_baseline.json and prints both side by side.
"""
import argparse
import json
import os
import sys

import mobileqat  # noqa: F401  (selects Keras 2 before TensorFlow loads)
from mobileqat import export, harness, training
from mobileqat._tf import keras, tfmot
from mobileqat.data import load_image_folder, synthetic_shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--data")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    args = p.parse_args(argv)
    report = json.load(open(os.path.join(args.out, "report.json")))
    cfg = report["config"]
    if args.data:
        ds = load_image_folder(args.data, args.input_size, args.channels, seed=cfg["seed"])
    else:
        ds = synthetic_shapes(report["dataset"]["train"], report["dataset"]["test"], args.input_size,
                              seed=cfg["seed"])
    float_model = keras.models.load_model(os.path.join(args.out, "float_model.keras"))
    qat = tfmot.quantization.keras.quantize_model(float_model)
    fit = training.fit(qat, ds.x_train, ds.y_train, cfg["qat_epochs"], cfg["batch_size"],
                       cfg["qat_learning_rate"], seed=cfg["seed"] + 1, verbose=1)
    path = os.path.join(args.out, "tfmot_int8.tflite")
    export.export_tflite(qat, path, "qat_int8", io_type=cfg["io_type"])
    val = harness.validate(path, ds.x_test, ds.y_test, model=qat)
    result = {"tfmot": {"accuracy_xnnpack": val["runtimes"]["xnnpack"].get("accuracy"),
                        "sim_accuracy": val.get("sim_accuracy"), "qat_step_s": fit["step_s"],
                        "reference": val["runtimes"]["reference"], "xnnpack": val["runtimes"]["xnnpack"]}}
    q = report["variants"]["qat_int8"]
    result["mobileqat"] = {"accuracy_xnnpack": q["accuracy"], "sim_accuracy": q["sim_accuracy"],
                           "qat_step_s": report["timings"]["qat_step_s"],
                           "fidelity": {k: v for k, v in q["fidelity"].items() if k != "per_layer"}}
    export.write_atomic(os.path.join(args.out, "tfmot_baseline.json"), json.dumps(result, indent=2).encode())
    t, m = result["tfmot"]["reference"], q["fidelity"]
    mf = m.get("float_simulation", m)
    print(f"{'':28}{'plain tfmot':>14}{'mobileqat':>14}{'mobileqat':>16}")
    print(f"{'simulation':28}{t.get('simulation', 'float'):>14}{'float':>14}{m.get('simulation'):>16}")
    print(f"{'int8 accuracy (XNNPACK)':28}{result['tfmot']['accuracy_xnnpack']:>14.4f}{q['accuracy']:>14.4f}"
          f"{q['accuracy']:>16.4f}")
    for label, key, ref in (("top-1 agreement (reference)", "top1_agreement", "top1_agreement_reference"),
                            ("within 1 LSB (reference)", "frac_within_1lsb", "frac_within_1lsb"),
                            ("max LSB (reference)", "max_lsb_diff", "max_lsb_diff")):
        print(f"{label:28}{t[key]:>14.4g}{mf[ref]:>14.4g}{m[ref]:>16.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
