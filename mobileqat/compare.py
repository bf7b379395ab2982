"""``mobileqat compare``: one float model, every quantized variant of it, one measured table (issue 13 item 6).

One float model is trained (or the user's is loaded), then each variant asked for is made from it, exported as a
file and measured on the held-out split:

- ``float``: the float .tflite;
- ``ptq_w8a8``: the converter's PTQ (representative data, int8 I/O); ``ptq_w8a8_mq``: ``mobileqat.ptq`` at W8A8;
- ``ptq_w4a8``: ``mobileqat.ptq`` at W4A8 (min-max ranges + bias correction by default);
- ``qat_w8a8``, ``qat_w4a8`` (min-max weights, EMA activations), ``qat_w4a8_lsq`` (LSQ weights started at
  max|w| / 7, LSQ+ activations), ``qat_w4a8_lsq_distill`` (the same trained against the float model,
  ``Distiller``), ``qat_mixed`` (8-bit first and last layers with weights, 4-bit in between: ``MIXED``);
  ``qat_w4a8_lsq_paperinit`` (LSQ with the paper's weight step 2 mean|w| / sqrt(7), ``QuantScheme(lsq_init="paper")``).

For each file: accuracy on XNNPACK over the whole test split, bytes and gzip bytes (``export.weight_summary``),
XNNPACK latency (median of ``bench_runs`` invokes, batch 1), for QAT the training step time against a float step
(median, before and after the batch-norm freeze when ``freeze_bn`` is set), and for every file mobileqat wrote its
integer twin's max output-code difference from the file on ``twin_images`` test images (reference kernels and
XNNPACK; 0 expected).

OUT/compare.json is rewritten after every variant, so an interrupted run keeps what finished; a rerun with the same
data and settings skips those variants (and resumes the float training and a QAT fine-tune from their
checkpoints). OUT/compare.md holds the table and the issue-13 goals, checked.
"""
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np

from mobileqat import architectures, export, harness, training
from mobileqat._tf import keras
from mobileqat.data import ImageFolderStream, calibration_subset
from mobileqat.export import write_atomic
from mobileqat.schemes import resolved
from mobileqat.stages import RunFolder, data_fingerprint, stage_key

# 8-bit first and last layers with weights, 4-bit weights in between (int8 activations everywhere)
MIXED = {"default": "w4a8", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"},
                                      {"match": {"position": "last"}, "scheme": "w8a8"}]}

# LSQ weights started at the paper's step 2 mean|w| / sqrt(Qp) instead of the min-max step max|w| / Qp, LSQ+ activations
LSQ_PAPER_INIT = {"name": "w4a8_lsq_paper", "weight_bits": 4, "packed_int4": True, "weight_method": "lsq",
                  "activation_method": "lsq", "lsq_init": "paper"}

# name -> (how it is made, scheme, distillation); the order is the table's
VARIANTS = {
    "float": ("float", None, False),
    "ptq_w8a8": ("ptq_converter", "w8a8", False),
    "ptq_w8a8_mq": ("ptq", "w8a8", False),
    "qat_w8a8": ("qat", "w8a8", False),
    "ptq_w4a8": ("ptq", "w4a8", False),
    "qat_w4a8": ("qat", "w4a8", False),
    "qat_w4a8_lsq": ("qat", "w4a8_lsq", False),
    "qat_w4a8_lsq_distill": ("qat", "w4a8_lsq", True),
    "qat_mixed": ("qat", MIXED, False),
    "qat_w4a8_lsq_paperinit": ("qat", LSQ_PAPER_INIT, False),
}
DEFAULT_VARIANTS = ("float", "ptq_w8a8", "qat_w8a8", "ptq_w4a8", "qat_w4a8", "qat_w4a8_lsq", "qat_w4a8_lsq_distill",
                    "qat_mixed")
DESCRIPTIONS = {
    "float": "float32 file",
    "ptq_w8a8": "converter PTQ, int8",
    "ptq_w8a8_mq": "mobileqat.ptq W8A8",
    "qat_w8a8": "QAT W8A8",
    "ptq_w4a8": "mobileqat.ptq W4A8",
    "qat_w4a8": "QAT W4A8, min-max",
    "qat_w4a8_lsq": "QAT W4A8, LSQ",
    "qat_w4a8_lsq_distill": "QAT W4A8, LSQ + distillation",
    "qat_mixed": "QAT mixed: 8-bit first/last, 4-bit middle",
    "qat_w4a8_lsq_paperinit": "QAT W4A8, LSQ started at 2 mean|w|/sqrt(7)",
}


@dataclasses.dataclass
class CompareConfig:
    """Knobs of ``compare`` (defaults: the demo's model and recipe)."""

    model: str = "mobilenet_v2"
    alpha: float = 0.35
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    qat_epochs: int = 2
    qat_learning_rate: float = 2e-4
    qat_warmup: float = 0.1
    freeze_bn: Optional[int] = None  # QAT optimizer step from which folded batch norms use moving statistics
    distill: tuple = (4.0, 0.5)  # (temperature, hard-label weight alpha) of the distillation variant
    ptq_method: str = "minmax"  # mobileqat.ptq range method of the ptq_* variants
    ptq_bias_correction: bool = True
    calibration_images: int = 256
    twin_images: int = 32
    bench_runs: int = 100
    threads: int = 1
    seed: int = 0
    verbose: int = 1
    eval_chunk_mb: int = 128
    variants: tuple = DEFAULT_VARIANTS
    model_file: Optional[str] = None  # the user's trained float model: no float training


def check_variants(names):
    """The variant names, checked (a tuple, order kept, duplicates dropped); ValueError naming the unknown ones."""
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"choose from: {', '.join(VARIANTS)} (comma-separated, e.g. --variants float,ptq_w8a8,"
                         "qat_w8a8)" if unknown else "no variant given; choose from: " + ", ".join(VARIANTS))
    return names


def _log(cfg, msg):
    if cfg.verbose:
        print(f"[mobileqat compare] {msg}", flush=True)


class PhaseTimer(keras.callbacks.Callback):
    """Wall time of each training step, split at optimizer step ``split`` (None: one phase). ``median_s(phase)``
    skips the first 3 steps of each phase (tracing; the batch-norm freeze retraces)."""

    def __init__(self, split=None):
        super().__init__()
        self.split, self.times = split, {"before": [], "after": []}

    def on_train_batch_begin(self, batch, logs=None):
        self._step = int(keras.backend.get_value(self.model.optimizer.iterations))
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        phase = "after" if self.split is not None and self._step >= self.split else "before"
        self.times[phase].append(time.perf_counter() - self._t0)

    def median_s(self, phase="before"):
        t = self.times[phase]
        steady = t[3:] or t
        return float(np.median(steady)) if steady else None


def compare(dataset, out_dir, cfg=CompareConfig(), float_model=None):
    """Make and measure every variant of ``cfg.variants``; returns the compare.json dict.

    dataset: ``mobileqat.data.Dataset`` (in memory) or ``ImageFolderStream``. float_model: the user's trained model
    (``pipeline.load_model_file``; ``cfg.model_file`` names its file) instead of training ``cfg.model``.
    Writes OUT/<variant>.tflite, OUT/<variant>_model.h5 (mobileqat's PTQ and QAT models), OUT/float_model.keras,
    OUT/compare.json (after each variant) and OUT/compare.md. Accuracies are fractions in [0, 1] on the test split
    by XNNPACK; bytes from the file; latency in ms; step times in s.
    """
    from mobileqat import pipeline
    from mobileqat.calibration import ptq
    from mobileqat.quantize import load_qat_model, quantize
    names = check_variants(cfg.variants)
    user = float_model is not None
    if user and not cfg.model_file:
        raise ValueError("compare: float_model given without cfg.model_file; set CompareConfig(model_file=path).")
    if not user and cfg.model not in architectures.MODELS:
        raise ValueError(f"unknown model {cfg.model!r}: use one of {sorted(architectures.MODELS)}.")
    if cfg.twin_images < 1 or cfg.calibration_images < 1:
        raise ValueError("compare: twin_images and calibration_images must be >= 1.")
    training.Distiller.check_arguments(*cfg.distill)
    alpha = cfg.alpha if not user and architectures.takes_alpha(cfg.model) else None
    streamed = isinstance(dataset, ImageFolderStream)
    n_train, n_test = pipeline._counts(dataset)
    if n_train == 0 or n_test == 0:
        raise ValueError(f"data set {dataset.name!r} needs training and test images (train {n_train}, test {n_test}).")
    folder = RunFolder(out_dir)
    out = folder.path
    folder.start()
    data_key = dataset.fingerprint() if streamed else data_fingerprint(dataset)
    pcfg = pipeline.RunConfig(verbose=cfg.verbose, seed=cfg.seed)

    def training_data(seed):
        if streamed:
            return dataset.dataset("train", cfg.batch_size, shuffle=True, seed=seed), None
        return dataset.x_train, dataset.y_train

    # --- the float model
    if user:
        info = pipeline.model_file_info(float_model, cfg.model_file)
        float_key = stage_key(data=data_key, model_file=info["sha256"])
        from_logits = info["output"] == "logits"
        float_step = _float_step_time(float_model, training_data(cfg.seed), cfg, from_logits)
        model_entry = {"name": os.path.basename(cfg.model_file), "source": "model_file", **info}
    else:
        float_key = stage_key(data=data_key, model=cfg.model, alpha=alpha, epochs=cfg.epochs,
                              batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)
        float_model, fit = pipeline._trained(
            folder, "float", float_key, os.path.join(out, "float_model.keras"), load=keras.models.load_model,
            build=lambda: architectures.build(cfg.model, dataset.input_shape, dataset.classes, alpha=alpha),
            train=lambda m, ckpt: training.fit(m, *training_data(cfg.seed), cfg.epochs, cfg.batch_size,
                                               cfg.learning_rate, checkpoint_dir=ckpt, seed=cfg.seed,
                                               verbose=cfg.verbose),
            cfg=pcfg, what=f"float training: {n_train} images, {cfg.epochs} epochs")
        from_logits = False
        float_step = fit["step_s"]
        model_entry = {"name": cfg.model, "source": "built_in", "alpha": alpha}
    model_entry["params"] = int(float_model.count_params())

    json_path = os.path.join(out, "compare.json")
    previous = _read(json_path)
    result = {"dataset": dataset.summary(), "model": model_entry,
              "config": dict(dataclasses.asdict(cfg), variants=list(names)),
              "float_step_s": float_step, "variants": {}}
    calib = None
    test_x, test_y = _test_split(dataset, cfg)
    steps_per_epoch = _steps_per_epoch(dataset, n_train, cfg.batch_size)

    for name in names:
        how, scheme, distill = VARIANTS[name]
        key = stage_key(float=float_key, variant=name, scheme=resolved(scheme), **_variant_settings(how, distill, cfg))
        old = (previous.get("variants") or {}).get(name)
        if old is not None and old.get("key") == key:
            _log(cfg, f"{name}: measured earlier with the same data and settings, kept")
            if how == "qat" and "paired" not in old.get("train", {}):  # measured before paired step times existed
                _paired(old, float_model, os.path.join(out, f"{name}_model.h5"), test_x, test_y, cfg, from_logits)
            result["variants"][name] = old
            continue
        path = os.path.join(out, f"{name}.tflite")
        entry = {"key": key, "description": DESCRIPTIONS[name], "how": how,
                 "scheme": scheme}
        qmodel = None
        if how == "float":
            pipeline._once(folder, f"export_{name}", key, (path,),
                           lambda: export.export_tflite(float_model, path, "float"), pcfg, f"{name}: export")
        elif how == "ptq_converter":
            calib = calib if calib is not None else calibration_subset(dataset, cfg.calibration_images, seed=cfg.seed)
            pipeline._once(folder, f"export_{name}", key, (path,),
                           lambda: export.export_tflite(float_model, path, "ptq_int8", calib, io_type="int8"),
                           pcfg, f"{name}: converter PTQ export")
        elif how == "ptq":
            calib = calib if calib is not None else calibration_subset(dataset, cfg.calibration_images, seed=cfg.seed)
            h5 = os.path.join(out, f"{name}_model.h5")

            def make_ptq():
                t0 = time.perf_counter()
                m = ptq(float_model, calib, scheme, method=cfg.ptq_method, bias_correction=cfg.ptq_bias_correction)
                export.save_keras_model(m, h5)
                export.export_tflite(m, path, "qat_int8", io_type="int8")
                entry["calibration_s"] = time.perf_counter() - t0
            pipeline._once(folder, f"export_{name}", key, (path, h5), make_ptq, pcfg,
                           f"{name}: mobileqat.ptq {cfg.ptq_method}"
                           f"{' + bias correction' if cfg.ptq_bias_correction else ''}, export")
            qmodel = load_qat_model(h5)
        else:  # qat
            h5 = os.path.join(out, f"{name}_model.h5")
            timer = PhaseTimer(cfg.freeze_bn)
            callbacks = [timer] + ([training.FreezeBatchNorm(cfg.freeze_bn)] if cfg.freeze_bn is not None else [])

            def trainee(m):
                if distill:
                    return training.Distiller(m, float_model, temperature=cfg.distill[0], alpha=cfg.distill[1])
                return m
            qmodel, fit = pipeline._trained(
                folder, name, key, h5, load=load_qat_model, build=lambda: quantize(float_model, scheme),
                train=lambda m, ckpt: dict(training.fit(
                    trainee(m), *training_data(cfg.seed + 1), cfg.qat_epochs, cfg.batch_size, cfg.qat_learning_rate,
                    from_logits=from_logits, checkpoint_dir=ckpt, seed=cfg.seed + 1, verbose=cfg.verbose,
                    warmup=cfg.qat_warmup, callbacks=callbacks),
                    before_freeze_step_s=timer.median_s("before"), after_freeze_step_s=timer.median_s("after")),
                cfg=pcfg, what=f"{name}: QAT {cfg.qat_epochs} epochs ({steps_per_epoch} steps each)"
                               f"{', distilled from the float model' if distill else ''}")
            pipeline._once(folder, f"export_{name}", key, (path,),
                           lambda: export.export_tflite(qmodel, path, "qat_int8", io_type="int8"), pcfg,
                           f"{name}: export")
            entry["train"] = {"step_s": fit.get("step_s"), "before_freeze_step_s": fit.get("before_freeze_step_s"),
                              "after_freeze_step_s": fit.get("after_freeze_step_s"),
                              "loss": (fit.get("history") or {}).get("loss")}
            entry["train"]["step_vs_float"] = _ratio(fit.get("before_freeze_step_s") or fit.get("step_s"),
                                                      float_step)
            entry["train"]["after_freeze_step_vs_float"] = _ratio(fit.get("after_freeze_step_s"), float_step)
        _log(cfg, f"{name}: accuracy on XNNPACK ({n_test} test images), size, latency, twin")
        entry.update(_measure(path, qmodel, test_x, test_y, cfg))
        if how == "qat":
            _paired(entry, float_model, h5, test_x, test_y, cfg, from_logits)
        result["variants"][name] = entry
        _finish(result, out)
        _log(cfg, f"{name}: accuracy {_pct(entry['accuracy'])}, {entry['bytes']:,} B "
                  f"(gzip {entry['gzip_bytes']:,} B), {_ms(entry['latency_ms'])} ms")
    return _finish(result, out)


def paired_step_times(float_model, qat_model, x, y, rounds=10, frozen=True, from_logits=False):
    """Training step times of ``float_model`` and ``qat_model`` measured in turns (float, QAT, float, ...) on the
    batch ``x`` (N, H, W, C), ``y`` (N,), so that both see the same machine load: {"float_step_s", "qat_step_s"
    (medians, s), "ratio" (median of the per-round QAT / float ratios), "rounds", "frozen"}. Copies are trained
    (Adam at a learning rate of 1e-12, so the weights barely move), the models given are left as they are. With
    ``frozen`` the QAT copy's folded batch norms use their moving statistics (one convolution, as after
    ``FreezeBatchNorm``); the float copy trains with batch statistics, as float training does."""
    fl = keras.models.clone_model(float_model)
    fl.set_weights(float_model.get_weights())
    if frozen:
        for layer in training.folded_layers(qat_model):
            layer.batch_statistics = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    for m in (fl, qat_model):
        m.compile(optimizer=keras.optimizers.Adam(1e-12), loss=loss)
        m.train_on_batch(x, y)  # trace
        m.train_on_batch(x, y)
    times = {"float": [], "qat": []}
    for _ in range(rounds):
        for kind, m in (("float", fl), ("qat", qat_model)):
            t0 = time.perf_counter()
            m.train_on_batch(x, y)
            times[kind].append(time.perf_counter() - t0)
    ratio = np.median(np.array(times["qat"]) / np.array(times["float"]))
    return {"float_step_s": float(np.median(times["float"])), "qat_step_s": float(np.median(times["qat"])),
            "ratio": float(ratio), "rounds": rounds, "frozen": bool(frozen)}


def _paired(entry, float_model, h5, test_x, test_y, cfg, from_logits):
    """entry["train"]["paired"]: ``paired_step_times`` of a fresh copy of the QAT model saved in ``h5`` (BN frozen
    when the run freezes it) against the float model, on one batch of test images."""
    from mobileqat.quantize import load_qat_model
    _log(cfg, f"{os.path.basename(h5)}: training step time against float, in turns")
    n = min(cfg.batch_size, len(test_x))
    entry.setdefault("train", {})["paired"] = paired_step_times(
        float_model, load_qat_model(h5), test_x[:n], test_y[:n], frozen=cfg.freeze_bn is not None,
        from_logits=from_logits)


def _variant_settings(how, distill, cfg):
    """The settings a variant's result depends on, for its key."""
    if how == "float":
        return {}
    if how == "ptq_converter":
        return {"calibration_images": cfg.calibration_images}
    if how == "ptq":
        return {"calibration_images": cfg.calibration_images, "method": cfg.ptq_method,
                "bias_correction": cfg.ptq_bias_correction}
    return {"qat_epochs": cfg.qat_epochs, "qat_learning_rate": cfg.qat_learning_rate, "qat_warmup": cfg.qat_warmup,
            "freeze_bn": cfg.freeze_bn, "batch_size": cfg.batch_size, "seed": cfg.seed,
            **({"distill": list(cfg.distill)} if distill else {})}


def _measure(path, qmodel, test_x, test_y, cfg):
    """Accuracy (XNNPACK, whole test split), bytes / gzip bytes / weight grids, XNNPACK latency, and for a file
    mobileqat wrote from ``qmodel`` its twin's max output-code difference on the first ``twin_images`` images."""
    val = harness.validate(path, test_x, test_y, runtimes=("xnnpack",), threads=cfg.threads)
    x = val["runtimes"]["xnnpack"]
    summary = export.weight_summary(path)
    bench = harness.benchmark(path, runtimes=("xnnpack",), threads=cfg.threads, runs=cfg.bench_runs)
    entry = {"accuracy": x.get("accuracy"), "bytes": summary["bytes"], "gzip_bytes": summary["gzip_bytes"],
             "grids": summary["grids"], "latency_ms": bench["latency_ms"].get("xnnpack"),
             "latency_p90_ms": bench["latency_p90_ms"].get("xnnpack")}
    errors = {"xnnpack": x["error"]} if "error" in x else {}
    errors.update({f"bench/{k}": v for k, v in bench["errors"].items()})
    if qmodel is not None:
        n = min(cfg.twin_images, len(test_x))
        twin = harness.validate(path, test_x[:n], test_y[:n], model=qmodel, runtimes=("reference", "xnnpack"),
                                threads=cfg.threads)
        entry["twin"] = {"images": n}
        for rt_name, r in twin["runtimes"].items():
            if "error" in r:
                errors[f"twin/{rt_name}"] = r["error"]
            elif r.get("simulation") == "integer":
                entry["twin"][f"max_lsb_{rt_name}"] = int(r["max_lsb_diff"])
        if twin.get("integer_path_error"):
            entry["twin"]["integer_path_error"] = twin["integer_path_error"]
    if errors:
        entry["errors"] = errors
    return entry


def _test_split(dataset, cfg):
    """(x, y) of the whole test split as arrays (an image folder's is decoded here, chunk by chunk)."""
    from mobileqat import pipeline
    xs, ys = zip(*pipeline._test_chunks(dataset, cfg.eval_chunk_mb))
    return np.concatenate(xs), np.concatenate(ys)


def _steps_per_epoch(dataset, n_train, batch_size):
    return int(np.ceil(n_train / batch_size))


def _float_step_time(model, data, cfg, from_logits, steps=20):
    """Median float training step (s) of the user's model: a copy trained ``steps`` steps at learning rate ~0."""
    x, y = data
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    if y is None:
        x = x.take(steps)
    else:
        x, y = x[:steps * cfg.batch_size], y[:steps * cfg.batch_size]
    return training.fit(copy, x, y, 1, cfg.batch_size, 1e-12, from_logits=from_logits, verbose=0)["step_s"]


def _ratio(a, b):
    return a / b if a is not None and b else None


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _finish(result, out):
    result["goals"] = goals(result)
    write_atomic(os.path.join(out, "compare.json"), json.dumps(result, indent=2, default=_plain).encode())
    write_atomic(os.path.join(out, "compare.md"), markdown(result).encode())
    return result


def _plain(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(type(v).__name__)


def _points(a, b):
    """a - b in percentage points, or None."""
    return None if a is None or b is None else round(100 * (a - b), 4)


def goals(result):
    """Issue 13's goals, checked on what was measured: {goal: {"value", "target", "met"}} (goals whose variants
    were not run are left out)."""
    v = result["variants"]
    acc = {k: e.get("accuracy") for k, e in v.items()}
    out = {}
    f = acc.get("float")
    if f is not None and acc.get("qat_w8a8") is not None:
        drop = _points(f, acc["qat_w8a8"])
        out["qat_w8a8_within_0.2_points_of_float"] = {"value": drop, "target": "<= 0.2", "met": drop <= 0.2}
    qat4 = {k: acc[k] for k in ("qat_w4a8", "qat_w4a8_lsq", "qat_w4a8_lsq_distill", "qat_w4a8_lsq_paperinit")
            if acc.get(k) is not None}
    if f is not None and qat4:
        best = max(qat4, key=qat4.get)
        drop = _points(f, qat4[best])
        out["qat_w4a8_within_1.5_points_of_float"] = {"variant": best, "value": drop, "target": "<= 1.5",
                                                      "met": drop <= 1.5}
        ptq4 = acc.get("ptq_w4a8")
        if ptq4 is not None:
            ptq_loss = _points(f, ptq4)
            gain = _points(qat4[best], ptq4)
            if ptq_loss > 3:
                out["qat_w4a8_2_points_above_ptq_w4a8"] = {"variant": best, "ptq_loss": ptq_loss, "value": gain,
                                                           "target": ">= 2 (PTQ W4A8 loses > 3)", "met": gain >= 2}
            elif ptq_loss > 0:
                recovered = gain / ptq_loss
                out["qat_w4a8_recovers_2_3_of_ptq_loss"] = {
                    "variant": best, "ptq_loss": ptq_loss, "value": round(recovered, 4), "target": ">= 0.667",
                    "met": recovered >= 2 / 3}
    # the step ratio measured in turns with a frozen BN where there is one (same load for both), else the run's
    ratios = {}
    for k, e in v.items():
        t = e.get("train") or {}
        p = t.get("paired") or {}
        ratios[k] = p.get("ratio") if p.get("frozen") else t.get("after_freeze_step_vs_float")
    ratios = {k: r for k, r in ratios.items() if r is not None and k != "qat_w4a8_lsq_distill"}  # teacher excluded
    if ratios:
        worst = max(ratios, key=ratios.get)
        out["qat_step_after_bn_freeze_within_1.25x_float"] = {
            "variant": worst, "value": round(ratios[worst], 4), "target": "<= 1.25", "met": ratios[worst] <= 1.25}
    return out


def _pct(a):
    return "–" if a is None else f"{100 * a:.1f} %"


def _ms(v):
    return "–" if v is None else f"{v:.3f}"


def _x(v):
    return "–" if v is None else f"{v:.2f}×"


def markdown(result):
    """compare.md: the table, then the goals."""
    d, m = result["dataset"], result["model"]
    f = (result["variants"].get("float") or {}).get("accuracy")
    name = m["name"] + (f" α {m['alpha']}" if m.get("alpha") is not None else "")
    shape = "×".join(map(str, d["input_shape"]))
    lines = [f"# mobileqat compare: {name}, {d['name']} ({d['train']:,} train / {d['test']:,} test, {shape}, "
             f"{d['classes']} classes)", "",
             "| variant | accuracy (XNNPACK) | vs float (points) | bytes | gzip bytes | weight grids | "
             "latency XNNPACK (ms) | train step vs float: in the run, before / after BN freeze; in turns | "
             "twin max LSB ref / XNNPACK |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(result["variants"], key=list(VARIANTS).index):  # the table's order, whatever the run's
        e = result["variants"][k]
        t = e.get("train") or {}
        step = "–" if not t else f"{_x(t.get('step_vs_float'))} / {_x(t.get('after_freeze_step_vs_float'))}"
        if t.get("paired"):
            step += f"; in turns {_x(t['paired']['ratio'])}"
        tw = e.get("twin")
        if tw is None:
            twin = "–"
        elif "integer_path_error" in tw:
            twin = "not lowered"
        else:
            twin = f"{tw.get('max_lsb_reference', '?')} / {tw.get('max_lsb_xnnpack', '?')}"
        drop = _points(e.get("accuracy"), f)
        grids = ", ".join(f"{n} × {g}" for g, n in (e.get("grids") or {}).items()) or "float32"
        lines.append(f"| {k} ({e['description']}) | {_pct(e.get('accuracy'))} | "
                     f"{'' if k == 'float' or drop is None else f'{drop:+.1f}'} | {e['bytes']:,} | "
                     f"{e['gzip_bytes']:,} | {grids} | {_ms(e.get('latency_ms'))} | {step} | {twin} |")
    fs = result.get("float_step_s")
    lines += ["", f"Float training step: {fs:.3f} s (median)." if fs else "",
              "Twin: `mobileqat.lower` of the model that wrote the file against the file, max output-code difference "
              f"on the first {result['config']['twin_images']} test images.", "", "## Issue 13 goals", ""]
    for goal, g in result.get("goals", {}).items():
        who = f" ({g['variant']})" if "variant" in g else ""
        lines.append(f"- {goal}{who}: {g['value']} (target {g['target']}): {'met' if g['met'] else 'NOT met'}")
    errors = {f"{k}/{e2}": msg for k, e in result["variants"].items() for e2, msg in (e.get("errors") or {}).items()}
    if errors:
        lines += ["", "## Errors", ""] + [f"- {k}: {msg}" for k, msg in errors.items()]
    return "\n".join(lines) + "\n"
