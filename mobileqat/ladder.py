"""``mobileqat auto``: PTQ first, QAT when needed, under an accuracy budget (issue 15 item 4).

The ladder climbs, cheapest first, and stops at the first rung whose integer file loses no more than
``budget`` points of accuracy (XNNPACK, held-out test split) against the float file:

1. ``ptq``: the converter's PTQ (W8A8; min-max ``mobileqat.ptq`` for a lower-bit target, the converter
   writes no 4-bit grid);
2. ``calibration``: ``mobileqat.ptq`` with the best range method of ``methods``, with or without bias
   correction, chosen on *training* images (``selection_images``, not the test split) by the fake-quant
   model's accuracy (bias correction helps at 4 bits and can cost at 8: both are tried);
3. ``adaround``: the same ranges and bias-correction choice with learned rounding (``mobileqat.adaround``);
4. ``mixed``: below 8 bits only: the per-layer sensitivity (``mobileqat.sensitivity``, on the selection
   images, min-max ranges) and the smallest mixed W8A8 / target plan meeting what is left of the budget (the
   budget minus what all-W8A8 PTQ loses there), then its file with the chosen calibration and AdaRound;
   for a W8A8 target there is no higher full-integer precision to mix in, so the rung is skipped (said so);
5. ``qat``: QAT fine-tune of the float model (the mixed plan's rules when rung 4 made one, else the target
   scheme), ``qat_epochs`` epochs at the recipe's learning rate and warm-up.

OUT/ladder.json is rewritten after every rung: a rerun with the same model, data and settings keeps the rungs
measured before and resumes a QAT fine-tune from its checkpoint. The chosen rung's files are copied to
OUT/model.tflite (and OUT/model.h5 when mobileqat wrote it) and checked on both runtimes against its integer
twin in OUT/report.json and report.md.
"""
import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import numpy as np

from mobileqat import compare, export, harness, provenance, training
from mobileqat.data import ImageFolderStream, calibration_indices, calibration_subset
from mobileqat.export import write_atomic
from mobileqat.schemes import resolved
from mobileqat.stages import RunFolder, data_fingerprint, stage_key

RUNGS = ("ptq", "calibration", "adaround", "mixed", "qat")
DESCRIPTIONS = {"float": "float32 file", "ptq": "PTQ, min-max ranges", "calibration": "PTQ, best calibration, with or without bias correction",
                "adaround": "PTQ + AdaRound", "mixed": "mixed-precision plan + AdaRound", "qat": "QAT fine-tune"}


@dataclasses.dataclass
class LadderConfig:
    """Knobs of ``auto``. budget: accuracy points the int8 file may lose against the float file."""

    budget: float = 0.5
    scheme: str = "w8a8"  # the target: a preset with int8 activations ("w8a8", "w4a8", ...)
    methods: tuple = ("minmax", "percentile", "mse")
    calibration_images: int = 256
    selection_images: int = 512  # training images that choose the calibration and the mixed plan
    adaround_iters: int = 1000
    qat_epochs: int = 2
    qat_learning_rate: float = 2e-4
    qat_warmup: float = 0.1
    batch_size: int = 64
    twin_images: int = 64
    bench_runs: int = 50
    threads: int = 1
    seed: int = 0
    verbose: int = 1
    eval_chunk_mb: int = 128
    model_file: Optional[str] = None


def _log(cfg, msg):
    if cfg.verbose:
        print(f"[mobileqat auto] {msg}", flush=True)


def check_config(cfg):
    """ValueError naming a bad setting (before any work)."""
    from mobileqat.calibration import _check_method
    from mobileqat.schemes import get_scheme
    if isinstance(cfg.budget, bool) or not isinstance(cfg.budget, (int, float)) or not np.isfinite(cfg.budget) \
            or cfg.budget < 0:
        raise ValueError(f"budget={cfg.budget!r}: the accuracy points the int8 file may lose against float, >= 0 "
                         "(e.g. 0.5).")
    scheme = get_scheme(cfg.scheme)
    if scheme.activation_bits != 8:
        raise ValueError(f"scheme {cfg.scheme!r} has {scheme.activation_bits}-bit activations; the ladder targets "
                         "full-integer int8 files: use 'w8a8' or a lower-bit-weight preset such as 'w4a8'.")
    if not cfg.methods:
        raise ValueError("methods: give at least one range method (minmax, percentile, mse).")
    for m in cfg.methods:
        _check_method(m, "methods")
    for name in ("calibration_images", "selection_images", "twin_images", "adaround_iters"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: use >= 1.")
    return scheme


def _labelled_training_subset(dataset, n, seed):
    """n stratified training images and their labels (not the calibration images: another seed)."""
    idx = calibration_indices(dataset.y_train, n, seed, dataset.name)
    if isinstance(dataset, ImageFolderStream):
        x = dataset.scale(dataset._decode([dataset.train_files[i] for i in idx]))
    else:
        x = np.asarray(dataset.x_train[idx], np.float32)
    return x, np.asarray(dataset.y_train)[idx].astype(np.int64)


def _accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=256, verbose=0).argmax(-1) == y))


def _write(result, out):
    write_atomic(os.path.join(out, "ladder.json"), json.dumps(result, indent=2, default=compare._plain).encode())
    write_atomic(os.path.join(out, "ladder.md"), markdown(result).encode())


def auto(dataset, out_dir, float_model, cfg=LadderConfig()):
    """Climb the ladder for ``float_model`` (trained, float) on ``dataset`` (``Dataset`` or ``ImageFolderStream``);
    returns the ladder.json dict: {"budget_points", "scheme", "float", "rungs": {name: entry}, "chosen"}. Each
    entry: accuracy (XNNPACK, test split, fraction), drop_points against float, bytes, gzip_bytes, latency_ms,
    seconds (making it), twin max LSB (files mobileqat wrote), meets_budget; or "skipped": why."""
    from mobileqat import pipeline
    from mobileqat.calibration import ptq
    from mobileqat.quantize import load_qat_model, quantize
    scheme = check_config(cfg)
    n_train, n_test = pipeline._counts(dataset)
    if n_train == 0 or n_test == 0:
        raise ValueError(f"data set {dataset.name!r} needs training and test images (train {n_train}, test {n_test}).")
    folder = RunFolder(out_dir)
    out = folder.path
    folder.start()
    streamed = isinstance(dataset, ImageFolderStream)
    data_key = dataset.fingerprint() if streamed else data_fingerprint(dataset)
    if cfg.model_file:
        info = pipeline.model_file_info(float_model, cfg.model_file)
        float_key, from_logits = stage_key(data=data_key, model_file=info["sha256"]), info["output"] == "logits"
    else:  # a model given in Python: keyed by its weights
        float_key = stage_key(data=data_key, model=provenance.fingerprint(float_model))
        from_logits = not pipeline._outputs_probabilities(float_model)
    pcfg = pipeline.RunConfig(verbose=cfg.verbose, seed=cfg.seed)
    measure_cfg = compare.CompareConfig(twin_images=cfg.twin_images, bench_runs=cfg.bench_runs, threads=cfg.threads,
                                        eval_chunk_mb=cfg.eval_chunk_mb)
    test_x, test_y = compare._test_split(dataset, measure_cfg)
    calib = calibration_subset(dataset, cfg.calibration_images, seed=cfg.seed)
    sel_x, sel_y = _labelled_training_subset(dataset, cfg.selection_images, cfg.seed + 1)
    json_path = os.path.join(out, "ladder.json")
    previous = compare._read(json_path)
    result = {"budget_points": float(cfg.budget), "scheme": cfg.scheme, "dataset": dataset.summary(),
              "config": dataclasses.asdict(cfg), "rungs": {}, "chosen": None}

    def kept(name, key):
        old = (previous.get("rungs") or {}).get(name) if name != "float" else previous.get("float")
        if old is not None and old.get("key") == key:
            _log(cfg, f"{name}: measured earlier with the same model, data and settings, kept")
            return old
        return None

    # the float file: the reference every rung is held to
    key = stage_key(float=float_key, rung="float")
    entry = kept("float", key)
    if entry is None:
        path = os.path.join(out, "float.tflite")
        export.export_tflite(float_model, path, "float")
        entry = {"key": key, "description": DESCRIPTIONS["float"], **compare._measure(path, None, test_x, test_y,
                                                                                      measure_cfg)}
    result["float"] = entry
    float_acc = entry["accuracy"]
    if float_acc is None:
        raise RuntimeError(f"the float file could not run on XNNPACK: {entry.get('errors')}")
    _write(result, out)

    # carried up the ladder: the chosen range method and bias correction, the mixed plan
    state = {"method": None, "bias_correction": True, "rules": None}

    def calibrated(how):  # "percentile<how> + bias correction": the calibration rung's choice, described
        return f"{state['method']}{how}{' + bias correction' if state['bias_correction'] else ''}"

    def make(name, path, h5):
        """Make rung ``name``'s file at ``path`` (and its model at ``h5``); returns (info dict, made a model?)
        or (skip reason, None)."""
        if name == "ptq":
            if scheme.weight_bits == 8:
                export.export_tflite(float_model, path, "ptq_int8", calib, io_type="int8")
                return {"how": "converter PTQ (representative data, min-max)"}, False
            q = ptq(float_model, calib, cfg.scheme, method="minmax")
            export.save_keras_model(q, h5)
            export.export_tflite(q, path)
            return {"how": "mobileqat.ptq min-max (the converter writes no sub-8-bit grid)"}, True
        if name == "calibration":
            scores, best = {}, None
            for m in cfg.methods:
                for bc in (False, True):
                    q = ptq(float_model, calib, cfg.scheme, method=m, bias_correction=bc)
                    label = m + (" + bias correction" if bc else "")
                    scores[label] = _accuracy(q, sel_x, sel_y)
                    if best is None or scores[label] > scores[best[0]]:
                        best = (label, m, bc, q)
            state["method"], state["bias_correction"] = best[1], best[2]
            export.save_keras_model(best[3], h5)
            export.export_tflite(best[3], path)
            return {"method": best[1], "bias_correction": best[2], "selection_accuracy": scores,
                    "how": f"mobileqat.ptq {best[0]} (chosen on {len(sel_y)} training images)"}, True
        if name == "adaround":
            q = ptq(float_model, calib, cfg.scheme, method=state["method"], bias_correction=state["bias_correction"],
                    adaround=True, adaround_iters=cfg.adaround_iters, seed=cfg.seed)
            export.save_keras_model(q, h5)
            export.export_tflite(q, path)
            return {"method": state["method"], "bias_correction": state["bias_correction"],
                    "how": "mobileqat.ptq " + calibrated(f" + AdaRound ({cfg.adaround_iters} steps per layer)")}, True
        if name == "mixed":
            if scheme.weight_bits >= 8:
                return (f"the target {cfg.scheme!r} is already the highest full-integer precision: no layer can "
                        "be kept higher"), None
            from mobileqat.sensitivity import SensitivityRun, layer_sensitivity, mixed_precision_plan
            # ranked with min-max ranges and no bias correction: each variant is then the calibrated baseline
            # with one weight quantizer switched (no re-calibration per layer); the plan's file gets the full treatment
            run = SensitivityRun(float_model, calib, sel_x, sel_y, high="w8a8", low=cfg.scheme, method="minmax",
                                 bias_correction=False, log=lambda m: _log(cfg, m))
            left = cfg.budget - 100.0 * (_accuracy(float_model, sel_x, sel_y) - run.base_accuracy)
            if left < 0:
                return (f"all-W8A8 PTQ already loses {cfg.budget - left:.2f} points on the selection images, more "
                        f"than the budget: no mixed plan can meet it"), None
            plan = mixed_precision_plan(layer_sensitivity(run), left, run)
            state["rules"] = plan["rules"]
            write_atomic(os.path.join(out, "plan.json"), json.dumps(plan["rules"], indent=2).encode())
            q = ptq(float_model, calib, plan["rules"], method=state["method"], bias_correction=state["bias_correction"],
                    adaround=True, adaround_iters=cfg.adaround_iters, seed=cfg.seed)
            export.save_keras_model(q, h5)
            export.export_tflite(q, path)
            return {"plan_budget_points": round(left, 4), "low_layers": plan["low_layers"], "rules": plan["rules"],
                    "how": f"{len(plan['low_layers'])} layers at {cfg.scheme}, the rest W8A8 (plan.json), "
                           f"+ " + calibrated(" ranges + AdaRound")}, True
        # qat
        target = state["rules"] or cfg.scheme
        qmodel, fit = pipeline._trained(
            folder, "auto_qat", stage_key(float=float_key, rung="qat", scheme=resolved(target), **_qat_settings(cfg)), h5,
            load=load_qat_model, build=lambda: quantize(float_model, target),
            train=lambda m, ckpt: training.fit(m, *_training_data(dataset, cfg), cfg.qat_epochs, cfg.batch_size,
                                               cfg.qat_learning_rate, from_logits=from_logits, checkpoint_dir=ckpt,
                                               seed=cfg.seed + 1, verbose=cfg.verbose, warmup=cfg.qat_warmup),
            cfg=pcfg, what=f"QAT fine-tune: {cfg.qat_epochs} epochs")
        export.export_tflite(qmodel, path)
        return {"scheme": target, "step_s": fit.get("step_s"),
                "how": f"QAT {cfg.qat_epochs} epochs, learning rate {cfg.qat_learning_rate:g}"}, True

    for name in RUNGS:
        calibration = {"methods": list(cfg.methods), "bias_correction": "chosen"}  # both tried since 2026-11-27
        settings = {"ptq": {}, "calibration": {**calibration, "selection": cfg.selection_images},
                    "adaround": {**calibration, "iters": cfg.adaround_iters},
                    "mixed": {**calibration, "iters": cfg.adaround_iters, "budget": cfg.budget},
                    "qat": _qat_settings(cfg)}[name]
        key = stage_key(float=float_key, rung=name, scheme=resolved(cfg.scheme), calibration_images=cfg.calibration_images,
                        seed=cfg.seed, **settings)
        entry = kept(name, key)
        if entry is None:
            path, h5 = os.path.join(out, f"{name}.tflite"), os.path.join(out, f"{name}_model.h5")
            _log(cfg, f"{name}: {DESCRIPTIONS[name]}")
            t0 = time.perf_counter()
            info, has_model = make(name, path, h5)
            if has_model is None:
                entry = {"key": key, "description": DESCRIPTIONS[name], "skipped": info}
            else:
                seconds = time.perf_counter() - t0
                qmodel = load_qat_model(h5) if has_model else None
                entry = {"key": key, "description": DESCRIPTIONS[name], **info, "seconds": round(seconds, 1),
                         "file": os.path.basename(path), "model": os.path.basename(h5) if has_model else None,
                         **compare._measure(path, qmodel, test_x, test_y, measure_cfg)}
                acc = entry.get("accuracy")
                entry["drop_points"] = None if acc is None else round(100.0 * (float_acc - acc), 4)
                entry["meets_budget"] = acc is not None and entry["drop_points"] <= cfg.budget + 1e-9
        else:  # carry what later rungs need; the budget may differ from the earlier run's
            state["method"] = entry.get("method", state["method"])
            state["bias_correction"] = entry.get("bias_correction", state["bias_correction"])
            state["rules"] = entry.get("rules", state["rules"])
            if "skipped" not in entry:
                entry["meets_budget"] = entry.get("drop_points") is not None and entry["drop_points"] <= cfg.budget + 1e-9
        result["rungs"][name] = entry
        _write(result, out)
        if "skipped" in entry:
            _log(cfg, f"{name}: skipped: {entry['skipped']}")
            continue
        _log(cfg, f"{name}: accuracy {100 * (entry['accuracy'] or 0):.2f} % (drop {entry['drop_points']:+.2f} points "
                  f"against float), {entry['bytes']:,} B")
        if entry["meets_budget"]:
            result["chosen"] = name
            break
    if result["chosen"] is None:
        tried = {n: e for n, e in result["rungs"].items() if e.get("accuracy") is not None}
        result["closest"] = max(tried, key=lambda n: tried[n]["accuracy"]) if tried else None
    _write(result, out)
    _write_chosen(result, out, test_x, test_y, cfg)
    return result


def _qat_settings(cfg):
    return {"qat_epochs": cfg.qat_epochs, "qat_learning_rate": cfg.qat_learning_rate, "qat_warmup": cfg.qat_warmup,
            "batch_size": cfg.batch_size}


def _training_data(dataset, cfg):
    if isinstance(dataset, ImageFolderStream):
        return dataset.dataset("train", cfg.batch_size, shuffle=True, seed=cfg.seed + 1), None
    return dataset.x_train, dataset.y_train


def _write_chosen(result, out, test_x, test_y, cfg):
    """OUT/model.tflite (+ model.h5) of the chosen rung (or the closest, flagged), and OUT/report.json: its
    validation on both runtimes (with the integer twin when mobileqat wrote the file) and latency."""
    from mobileqat.quantize import load_qat_model
    name = result["chosen"] or result.get("closest")
    if name is None:
        return
    entry = result["rungs"][name]
    src = os.path.join(out, entry["file"])
    shutil.copyfile(src, os.path.join(out, "model.tflite.part"))
    os.replace(os.path.join(out, "model.tflite.part"), os.path.join(out, "model.tflite"))
    model = None
    if entry.get("model"):
        shutil.copyfile(os.path.join(out, entry["model"]), os.path.join(out, "model.h5.part"))
        os.replace(os.path.join(out, "model.h5.part"), os.path.join(out, "model.h5"))
        model = load_qat_model(os.path.join(out, "model.h5"))
    val = harness.validate(os.path.join(out, "model.tflite"), test_x, test_y, model=model,
                           runtimes=("reference", "xnnpack"), threads=cfg.threads)
    bench = harness.benchmark(os.path.join(out, "model.tflite"), runtimes=("xnnpack", "reference"),
                              threads=cfg.threads, runs=cfg.bench_runs)
    report = {"chosen": result["chosen"], "closest": result.get("closest"), "meets_budget": result["chosen"] is not None,
              "budget_points": result["budget_points"], "float_accuracy": result["float"]["accuracy"],
              "rung": {k: v for k, v in entry.items() if k != "key"}, "validation": val, "benchmark": bench,
              "weights": export.weight_summary(os.path.join(out, "model.tflite"))}
    write_atomic(os.path.join(out, "report.json"), json.dumps(report, indent=2, default=compare._plain).encode())
    lines = [f"# mobileqat auto: {'rung ' + repr(name) + ' meets' if result['chosen'] else 'no rung meets'} the "
             f"budget of {result['budget_points']} points", "", markdown(result)]
    write_atomic(os.path.join(out, "report.md"), "\n".join(lines).encode())


def _pct(v):
    return "-" if v is None else f"{100 * v:.2f} %"


def markdown(result):
    """The ladder as a table: every rung tried, accuracy, drop, bytes, gzip bytes, latency, twin LSB, time."""
    rows = [("float", result.get("float", {}))] + list(result.get("rungs", {}).items())
    lines = [f"budget: {result['budget_points']} points against float; target scheme {result['scheme']}", "",
             "| rung | how | XNNPACK accuracy | drop (points) | bytes | gzip bytes | latency XNNPACK (ms) | twin max LSB "
             "ref / XNNPACK | made in (s) | meets budget |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in rows:
        if "skipped" in e:
            lines.append(f"| {name} | skipped: {e['skipped']} | | | | | | | | |")
            continue
        twin = e.get("twin") or {}
        lsb = f"{twin.get('max_lsb_reference', '-')} / {twin.get('max_lsb_xnnpack', '-')}" if twin else "-"
        lat = e.get("latency_ms")
        lines.append(f"| {name} | {e.get('how', e.get('description', ''))} | {_pct(e.get('accuracy'))} | "
                     f"{'-' if e.get('drop_points') is None else format(e['drop_points'], '+.2f')} | "
                     f"{e.get('bytes', 0):,} | {e.get('gzip_bytes', 0):,} | {'-' if lat is None else f'{lat:.3f}'} | "
                     f"{lsb} | {e.get('seconds', '-')} | {'yes' if e.get('meets_budget') else ('' if name == 'float' else 'no')} |")
    chosen = result.get("chosen")
    lines += ["", f"chosen: {chosen}" if chosen else
              f"no rung meets the budget; closest: {result.get('closest')} (its files are in OUT/model.tflite)"]
    return "\n".join(lines) + "\n"
