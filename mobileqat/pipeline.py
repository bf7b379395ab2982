"""The whole run: float training -> PTQ export -> QAT fine-tune -> QAT export -> harness -> report.

``run_pipeline`` is what ``mobileqat demo`` and ``mobileqat run`` call. Every number in the report
is measured in this run: accuracies by the TFLite runtime named, on the held-out test split.
"""
import dataclasses
import os
import time

from mobileqat import architectures, debug, export, harness, report as report_mod, training
from mobileqat._tf import keras
from mobileqat.data import calibration_subset
from mobileqat.export import save_keras_model
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.stages import RunFolder, data_fingerprint, stage_key


@dataclasses.dataclass
class RunConfig:
    """Knobs of one pipeline run (defaults: the demo)."""

    model: str = "mobilenet_v2"
    alpha: float = 0.35
    epochs: int = 10
    qat_epochs: int = 3
    batch_size: int = 64
    learning_rate: float = 2e-3
    qat_learning_rate: float = 2e-4
    io_type: str = "int8"
    threads: int = 1
    calibration_images: int = 256
    bench_runs: int = 100
    debug_images: int = 128
    seed: int = 0
    verbose: int = 1


def _log(cfg, msg):
    if cfg.verbose:
        print(f"[mobileqat] {msg}", flush=True)


def run_pipeline(dataset, out_dir, cfg=RunConfig()):
    """Run every stage on ``dataset`` (mobileqat.data.Dataset) and write ``out_dir``/report.json.

    Files in out_dir: float.tflite, ptq_int8.tflite, qat_int8.tflite, float_model.keras,
    qat_model.h5, report.json, report.md. Interrupted at any point, the same call resumes: finished
    stages (float training, QAT) are reused when data and settings are unchanged, training resumes
    from its last epoch (out_dir/checkpoints), and report.json is written last, only when every
    number in it was measured by this call. Returns the report dict.
    """
    if cfg.model not in architectures.BUILDERS:
        raise ValueError(f"unknown model {cfg.model!r}: use one of {sorted(architectures.BUILDERS)}.")
    for split, n in (("training", len(dataset.x_train)), ("test", len(dataset.y_test))):
        if n == 0:
            raise ValueError(f"data set {dataset.name!r} has no {split} images; a run needs both splits "
                             "(an image folder needs at least 2 readable images per class).")
    folder = RunFolder(out_dir)
    out_dir = folder.path
    folder.start()
    t_start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
    data_key = data_fingerprint(dataset)

    float_key = stage_key(data=data_key, model=cfg.model, alpha=cfg.alpha, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)
    float_model, float_fit = _trained(
        folder, "float", float_key, os.path.join(out_dir, "float_model.keras"),
        load=keras.models.load_model,
        build=lambda: architectures.BUILDERS[cfg.model](input_shape=dataset.input_shape, classes=dataset.classes,
                                                        alpha=cfg.alpha),
        train=lambda m, ckpt: training.fit(m, x_tr, y_tr, cfg.epochs, cfg.batch_size, cfg.learning_rate,
                                           checkpoint_dir=ckpt, seed=cfg.seed, verbose=cfg.verbose),
        cfg=cfg, what=f"float training: {len(x_tr)} images, {cfg.epochs} epochs")
    float_keras_acc = float(float_model.evaluate(x_te, y_te, verbose=0)[1])

    paths = {k: os.path.join(out_dir, f"{k}.tflite") for k in export.KINDS}

    def export_float():
        export.export_tflite(float_model, paths["float"], "float")
        calib = calibration_subset(dataset, cfg.calibration_images, seed=cfg.seed)
        export.export_tflite(float_model, paths["ptq_int8"], "ptq_int8", calib, io_type=cfg.io_type)
    _once(folder, "export_float", stage_key(float=float_key, io_type=cfg.io_type,
                                            calibration_images=cfg.calibration_images),
          (paths["float"], paths["ptq_int8"]), export_float, cfg, "export: float and PTQ int8")

    qat_key = stage_key(float=float_key, qat_epochs=cfg.qat_epochs,
                        qat_learning_rate=cfg.qat_learning_rate)
    qat_model, qat_fit = _trained(
        folder, "qat", qat_key, os.path.join(out_dir, "qat_model.h5"), load=load_qat_model,
        build=lambda: quantize(float_model, "w8a8"),
        train=lambda m, ckpt: training.fit(m, x_tr, y_tr, cfg.qat_epochs, cfg.batch_size, cfg.qat_learning_rate,
                                           checkpoint_dir=ckpt, seed=cfg.seed + 1, verbose=cfg.verbose),
        cfg=cfg, what=f"QAT fine-tune: {cfg.qat_epochs} epochs")
    _once(folder, "export_qat", stage_key(qat=qat_key, io_type=cfg.io_type), (paths["qat_int8"],),
          lambda: export.export_tflite(qat_model, paths["qat_int8"], "qat_int8", io_type=cfg.io_type), cfg,
          "export: QAT int8")

    _log(cfg, "harness: reference kernels and XNNPACK")
    variants, errors = {}, {}
    for kind, model, runtimes in (("float", float_model, ("xnnpack",)),
                                  ("ptq_int8", None, ("reference", "xnnpack")),
                                  ("qat_int8", qat_model, ("reference", "xnnpack"))):
        val = harness.validate(paths[kind], x_te, y_te, model=model, runtimes=runtimes, threads=cfg.threads)
        bench = harness.benchmark(paths[kind], runtimes=("xnnpack", "reference") if kind == "qat_int8"
                                  else ("xnnpack",), threads=cfg.threads, runs=cfg.bench_runs)
        for name, r in val["runtimes"].items():
            if "error" in r:
                errors[f"{kind}/{name}"] = r["error"]
        errors.update({f"{kind}/bench/{k}": v for k, v in bench["errors"].items()})
        entry = {"accuracy": val["runtimes"].get("xnnpack", {}).get("accuracy"),
                 "accuracy_reference": val["runtimes"].get("reference", {}).get("accuracy"),
                 "tflite_bytes": val["tflite_bytes"], "latency_ms": bench["latency_ms"]}
        if kind == "float":
            entry["keras_accuracy"] = float_keras_acc
        if kind == "qat_int8":
            entry["sim_accuracy"] = val.get("sim_accuracy")
            entry["integer_sim_accuracy"] = val.get("integer_accuracy")
            entry["fidelity"] = fidelity_summary(val)
        variants[kind] = entry

    _log(cfg, "per-layer fidelity: Keras vs reference kernels; reference vs builtin and XNNPACK")
    per_layer = debug.debug_fidelity(qat_model, paths["qat_int8"], x_te[:cfg.debug_images])
    variants["qat_int8"]["fidelity"]["per_layer"] = [
        {k: row[k] for k in ("layer", "op", "integer_max_lsb_diff", "max_lsb_diff", "mean_lsb_diff",
                             "local_max_lsb_diff", "runtime_max_lsb_diff", "xnnpack_max_lsb_diff") if k in row}
        for row in per_layer["layers"]]
    variants["qat_int8"]["fidelity"]["first_layer_over_1lsb"] = per_layer["first_divergence"]
    variants["qat_int8"]["fidelity"]["first_integer_layer_over_0lsb"] = per_layer["first_integer_divergence"]
    variants["qat_int8"]["fidelity"]["xnnpack_twin_output_max_lsb_diff"] = per_layer["xnnpack_twin_output_max_lsb_diff"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    lat = {k: v["latency_ms"].get("xnnpack") for k, v in variants.items()}
    report = {
        "dataset": dataset.summary(),
        "model": {"name": cfg.model, "keras_name": float_model.name, "alpha": cfg.alpha,
                  "params": int(float_model.count_params())},
        "variants": variants,
        "timings": {"float_step_s": float_fit["step_s"], "qat_step_s": qat_fit["step_s"],
                    "total_s": time.perf_counter() - t_start},
        "ratios": {"int8_fp32_latency_xnnpack": ratio(lat["qat_int8"], lat["float"]),
                   "int8_fp32_size": ratio(variants["qat_int8"]["tflite_bytes"], variants["float"]["tflite_bytes"]),
                   "qat_float_step_time": ratio(qat_fit["step_s"], float_fit["step_s"])},
        "accuracy_drop_points": {kind: _drop_points(variants["float"]["accuracy"], variants[kind]["accuracy"])
                                 for kind in ("ptq_int8", "qat_int8")},
        "config": dataclasses.asdict(cfg),
        "training": {"float": float_fit["history"], "qat": qat_fit["history"]},
        "errors": errors,
    }
    report_mod.write_report(report, out_dir)
    return report


def _trained(folder, stage, key, model_path, load, build, train, cfg, what):
    """A stage that trains a model: reuse it when it finished under ``key``, else build, train
    (resuming from its checkpoints), save, and record it finished. Returns (model, fit result)."""
    done = folder.finished(stage, key, (model_path,))
    if done is not None:
        _log(cfg, f"{what}: finished earlier with the same data and settings, reusing {model_path}")
        return load(model_path), done
    checkpoints = os.path.join(folder.path, "checkpoints", stage)
    folder.begin(stage, key, checkpoints)
    keras.utils.set_random_seed(cfg.seed)
    model = build()
    _log(cfg, f"{what} ({model.name}, {model.count_params():,} params)")
    fit = train(model, checkpoints)
    save_keras_model(model, model_path)
    folder.finish(stage, key, fit)
    return model, fit


def _once(folder, stage, key, outputs, work, cfg, what):
    """A stage that writes files: skip it when it finished under ``key`` with ``outputs`` on disk."""
    if folder.finished(stage, key, outputs) is not None:
        _log(cfg, f"{what}: written earlier from the same models and settings, reusing")
        return
    folder.begin(stage, key)
    _log(cfg, what)
    work()
    folder.finish(stage, key, {})


def _drop_points(float_accuracy, int8_accuracy):
    """Float minus int8 accuracy on XNNPACK, in percentage points (positive: int8 is worse)."""
    if float_accuracy is None or int8_accuracy is None:
        return None
    return round(100 * (float_accuracy - int8_accuracy), 6)


def _runtime_pair(ref, xnn):
    """One simulation's comparison with the reference kernels and XNNPACK, flattened for report.json."""
    return {"top1_agreement_reference": ref.get("top1_agreement"),
            "top1_agreement_xnnpack": xnn.get("top1_agreement"),
            "frac_within_1lsb": ref.get("frac_within_1lsb"), "max_lsb_diff": ref.get("max_lsb_diff"),
            "frac_within_1lsb_xnnpack": xnn.get("frac_within_1lsb"), "max_lsb_diff_xnnpack": xnn.get("max_lsb_diff")}


def fidelity_summary(val):
    """report.json's qat_int8 "fidelity" from a harness.validate result: the simulation named in
    "simulation" (the integer-exact path where the model lowers, else the float one) against each
    runtime, and the float fake-quant simulation's numbers under "float_simulation"."""
    ref, xnn = val["runtimes"].get("reference", {}), val["runtimes"].get("xnnpack", {})
    out = {"simulation": ref.get("simulation"), **_runtime_pair(ref, xnn), "mean_lsb_diff": ref.get("mean_lsb_diff"),
           "float_simulation": _runtime_pair(ref.get("float_sim", {}), xnn.get("float_sim", {})),
           "reference_vs_xnnpack": val.get("reference_vs_xnnpack"), "provenance": val.get("provenance")}
    if val.get("integer_path_error"):
        out["integer_path_error"] = val["integer_path_error"]
    return out
