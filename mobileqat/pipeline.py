"""The whole run: float training (or the user's trained model) -> PTQ export -> QAT fine-tune -> QAT
export -> harness -> report.

``run_pipeline`` is what ``mobileqat demo`` and ``mobileqat run`` call. Every number in the report
is measured in this run: accuracies by the TFLite runtime named, on the held-out test split.
``load_model_file`` reads and checks the user's trained float model for ``mobileqat run --model-file``.
"""
import dataclasses
import hashlib
import os
import shutil
import time
from typing import Optional

import numpy as np

from mobileqat import architectures, debug, export, harness, report as report_mod, schemes, training
from mobileqat._tf import keras
from mobileqat.data import ImageFolderStream, calibration_subset
from mobileqat.device_check import sha256 as file_sha256
from mobileqat.export import save_keras_model
from mobileqat.quantize import load_qat_model, quantize, scheme_plan
from mobileqat.stages import RunFolder, data_fingerprint, stage_key


@dataclasses.dataclass
class RunConfig:
    """Knobs of one pipeline run (defaults: the demo)."""

    model: str = "mobilenet_v2"
    alpha: float = 0.35
    epochs: int = 10
    # QAT fine-tuning, the recommended recipe (issue 13): about 10-20 % of the float epochs, a learning rate
    # about 10x below the float one, a linear warm-up over the first ``qat_warmup`` of the steps
    qat_epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 2e-3
    qat_learning_rate: float = 2e-4
    qat_warmup: float = 0.1
    # QAT schedules (mobileqat.training callbacks); None / 0: off
    quant_delay: int = 0  # optimizer steps trained float (fake quantization bypassed) before quantizing
    freeze_bn: Optional[int] = None  # optimizer step from which folded batch norms use their moving statistics
    bit_schedule: Optional[str] = None  # weight bit width by QAT epoch, "BITS:EPOCH,...", e.g. "8:0,6:1,4:2"
    distill: Optional[tuple] = None  # (temperature, alpha): the float model teaches the QAT model (Distiller)
    bn_folding: str = "two_pass"  # FoldedConvBN training form: "two_pass" or "single_conv"
    io_type: str = "int8"  # of the integer files; a scheme with 16-bit activations ("w8a16") makes them "int16"
    threads: int = 1
    calibration_images: int = 256
    bench_runs: int = 100
    debug_images: int = 128
    seed: int = 0
    verbose: int = 1
    model_file: Optional[str] = None  # the user's trained float model (.keras/.h5): no float training
    augment: Optional[tuple] = None  # streamed data only: names from data.AUGMENTATIONS, for training
    cache: bool = False  # streamed data only: decoded training images cached in out_dir/cache
    eval_chunk_mb: int = 128  # streamed data only: test images held at once (float32), for the harness
    # the QAT scheme: a preset ("w8a8", "w4a8"), the path of a JSON rules file, or rules / a QuantScheme
    # (mobileqat.schemes); report.json records it and the scheme of every layer with weights
    scheme: object = "w8a8"


def _log(cfg, msg):
    if cfg.verbose:
        print(f"[mobileqat] {msg}", flush=True)


def run_pipeline(dataset, out_dir, cfg=RunConfig(), float_model=None, qat_model=None):
    """Run every stage on ``dataset`` and write ``out_dir``/report.json.

    dataset: a ``mobileqat.data.Dataset`` (in memory) or an ``ImageFolderStream`` (images read on
    demand: training through tf.data, calibration and test images decoded in chunks of at most
    ``cfg.eval_chunk_mb`` MB). float_model: the user's trained float model (``load_model_file``;
    ``cfg.model_file`` names its file): it is not trained again, only QAT-fine-tuned; qat_model: its
    ``quantize`` result when already made (checked by ``load_model_file``).
    Files in out_dir: float.tflite, ptq_int8.tflite, qat_int8.tflite, float_model.keras (trained here),
    qat_model.h5, report.json, report.md. Interrupted at any point, the same call resumes: finished
    stages (float training, QAT) are reused when data and settings are unchanged, training resumes
    from its last epoch (out_dir/checkpoints), and report.json is written last, only when every
    number in it was measured by this call. Returns the report dict.
    """
    user, prebuilt_qat = float_model is not None, qat_model
    if not user and cfg.model not in architectures.MODELS:
        raise ValueError(f"unknown model {cfg.model!r}: use one of {sorted(architectures.MODELS)}.")
    # the width multiplier of the models that have one (MobileNets); None for the others (ResNet, EfficientNet-Lite)
    alpha = cfg.alpha if not user and architectures.takes_alpha(cfg.model) else None
    if user and not cfg.model_file:
        raise ValueError("run_pipeline: float_model given without cfg.model_file; set RunConfig(model_file=path) "
                         "to the file the model was loaded from (it keys the run's stages).")
    streamed = isinstance(dataset, ImageFolderStream)
    n_train, n_test = _counts(dataset)
    for split, n in (("training", n_train), ("test", n_test)):
        if n == 0:
            raise ValueError(f"data set {dataset.name!r} has no {split} images; a run needs both splits "
                             "(an image folder needs at least 2 readable images per class).")
    if (cfg.augment or cfg.cache) and not streamed:
        raise ValueError("augment and cache apply to image folders read with mobileqat.data.image_folder_stream; "
                         "pass one, or leave them unset for in-memory data.")
    scheme, scheme_data = _scheme(cfg.scheme)
    io_type = _io_type(scheme, cfg.io_type)
    qat_schedule(cfg)  # a bad schedule stops the run now, before any training
    # rules that cannot apply stop the run now, before any training (an untrained copy has the same layers)
    layer_schemes = scheme_plan(float_model if user else architectures.build(
        cfg.model, dataset.input_shape, dataset.classes, alpha=alpha), scheme)
    if cfg.bit_schedule:  # the schedule must end on the exported weight grids (training.BitSchedule)
        low = min((int(e["scheme"].get("weight_bits", 8)) for e in layer_schemes.values()), default=8)
        last = list(training.BitSchedule(cfg.bit_schedule).schedule.values())[-1]
        if last > low:
            raise ValueError(f"bit schedule {cfg.bit_schedule!r} ends at {last} bits, but the scheme exports "
                             f"{low}-bit weights; end it at {low} (e.g. 8:0,6:1,{low}:2) or use a {last}-bit scheme.")
    folder = RunFolder(out_dir)
    out_dir = folder.path
    folder.start()
    t_start = time.perf_counter()
    data_key = dataset.fingerprint() if streamed else data_fingerprint(dataset)
    cache = _cache_prefix(out_dir, data_key) if (streamed and cfg.cache) else None
    augment = tuple(cfg.augment) if cfg.augment else None

    def training_data(seed):
        """(x, y) for training.fit: the arrays, or a tf.data pipeline of batches (y None)."""
        if streamed:
            return dataset.dataset("train", cfg.batch_size, shuffle=True, augment=augment, seed=seed, cache=cache), None
        return dataset.x_train, dataset.y_train

    if user:
        model_info = model_file_info(float_model, cfg.model_file)
        float_key = stage_key(data=data_key, model_file=model_info["sha256"])
        _log(cfg, f"float model: {cfg.model_file} ({float_model.name}, {float_model.count_params():,} params), "
                  "the user's trained model, not trained again")
        float_fit = {"history": None, "step_s": None}
        from_logits = model_info["output"] == "logits"
    else:
        float_key = stage_key(data=data_key, model=cfg.model, alpha=alpha, epochs=cfg.epochs,
                              batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed,
                              **({"augment": augment} if augment else {}))
        float_model, float_fit = _trained(
            folder, "float", float_key, os.path.join(out_dir, "float_model.keras"),
            load=keras.models.load_model,
            build=lambda: architectures.build(cfg.model, dataset.input_shape, dataset.classes, alpha=alpha),
            train=lambda m, ckpt: training.fit(m, *training_data(cfg.seed), cfg.epochs, cfg.batch_size,
                                               cfg.learning_rate, checkpoint_dir=ckpt, seed=cfg.seed,
                                               verbose=cfg.verbose),
            cfg=cfg, what=f"float training: {n_train} images, {cfg.epochs} epochs")
        from_logits = False

    paths = {k: os.path.join(out_dir, f"{k}.tflite") for k in export.KINDS}

    def export_float():
        export.export_tflite(float_model, paths["float"], "float")
        calib = calibration_subset(dataset, cfg.calibration_images, seed=cfg.seed)
        export.export_tflite(float_model, paths["ptq_int8"], "ptq_int8", calib, io_type=io_type)
    _once(folder, "export_float", stage_key(float=float_key, io_type=io_type,
                                            calibration_images=cfg.calibration_images),
          (paths["float"], paths["ptq_int8"]), export_float, cfg, "export: float and PTQ int8")

    default_scheme = scheme == schemes.PRESETS["w8a8"]
    schedule = qat_schedule(cfg)
    qat_key = stage_key(float=float_key, qat_epochs=cfg.qat_epochs, qat_learning_rate=cfg.qat_learning_rate,
                        qat_warmup=cfg.qat_warmup, **schedule,
                        **({"batch_size": cfg.batch_size, "seed": cfg.seed} if user else {}),
                        **({"augment": augment} if augment else {}),
                        **({} if default_scheme else {"scheme": schemes.resolved(scheme)}))
    qat_model, qat_fit = _trained(
        folder, "qat", qat_key, os.path.join(out_dir, "qat_model.h5"), load=load_qat_model,
        build=lambda: prebuilt_qat if prebuilt_qat is not None and default_scheme else quantize(float_model, scheme),
        train=lambda m, ckpt: training.fit(*_qat_trainee(m, float_model, cfg), *training_data(cfg.seed + 1),
                                           cfg.qat_epochs, cfg.batch_size, cfg.qat_learning_rate,
                                           from_logits=from_logits, checkpoint_dir=ckpt, seed=cfg.seed + 1,
                                           verbose=cfg.verbose, warmup=cfg.qat_warmup,
                                           callbacks=_qat_callbacks(cfg)),
        cfg=cfg, what=f"QAT fine-tune: {cfg.qat_epochs} epochs")
    _once(folder, "export_qat", stage_key(qat=qat_key, io_type=io_type), (paths["qat_int8"],),
          lambda: export.export_tflite(qat_model, paths["qat_int8"], "qat_int8", io_type=io_type), cfg,
          "export: QAT int8")

    _log(cfg, "harness: reference kernels and XNNPACK")
    kinds = (("float", float_model, ("xnnpack",)), ("ptq_int8", None, ("reference", "xnnpack")),
             ("qat_int8", qat_model, ("reference", "xnnpack")))
    parts, weights, keras_hits, debug_x = {kind: [] for kind, _, _ in kinds}, [], 0, None
    for x_te, y_te in _test_chunks(dataset, cfg.eval_chunk_mb):
        if debug_x is None:
            debug_x = x_te[:cfg.debug_images]
        keras_hits += int(np.sum(float_model.predict(x_te, batch_size=256, verbose=0).argmax(-1) == y_te))
        weights.append(len(y_te))
        for kind, model, runtimes in kinds:
            parts[kind].append(harness.validate(paths[kind], x_te, y_te, model=model, runtimes=runtimes,
                                                threads=cfg.threads))
    float_keras_acc = keras_hits / n_test
    variants, errors = {}, {}
    for kind, _, _ in kinds:
        val = merge_validations(parts[kind], weights)
        bench = harness.benchmark(paths[kind], runtimes=("xnnpack", "reference") if kind == "qat_int8"
                                  else ("xnnpack",), threads=cfg.threads, runs=cfg.bench_runs)
        for name, r in val["runtimes"].items():
            if "error" in r:
                errors[f"{kind}/{name}"] = r["error"]
        errors.update({f"{kind}/bench/{k}": v for k, v in bench["errors"].items()})
        entry = {"accuracy": val["runtimes"].get("xnnpack", {}).get("accuracy"),
                 "accuracy_reference": val["runtimes"].get("reference", {}).get("accuracy"),
                 "tflite_bytes": val["tflite_bytes"], "latency_ms": bench["latency_ms"]}
        if kind != "float":  # bytes, gzip bytes, weight tensors by grid; input/output type (int8, uint8, int16)
            entry["weights"] = export.weight_summary(paths[kind])
            entry["io_dtype"] = export.tensor_types(paths[kind])["input"]
        if kind == "float":
            entry["keras_accuracy"] = float_keras_acc
        if kind == "qat_int8":
            entry["scheme"] = {"given": scheme_data, "layers": layer_schemes}
            entry["sim_accuracy"] = val.get("sim_accuracy")
            entry["integer_sim_accuracy"] = val.get("integer_accuracy")
            entry["fidelity"] = fidelity_summary(val)
        variants[kind] = entry

    _log(cfg, "per-layer fidelity: Keras vs reference kernels; reference vs builtin and XNNPACK")
    per_layer = debug.debug_fidelity(qat_model, paths["qat_int8"], debug_x)
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
    if user:
        model_entry = {"name": os.path.basename(cfg.model_file), "source": "model_file", **model_info,
                       "keras_name": float_model.name, "params": int(float_model.count_params())}
    else:
        model_entry = {"name": cfg.model, "source": "built_in", "keras_name": float_model.name, "alpha": alpha,
                       "params": int(float_model.count_params())}
    report = {
        "dataset": dataset.summary(),
        "model": model_entry,
        "variants": variants,
        "timings": {"float_step_s": float_fit["step_s"], "qat_step_s": qat_fit["step_s"],
                    "total_s": time.perf_counter() - t_start},
        "ratios": {"int8_fp32_latency_xnnpack": ratio(lat["qat_int8"], lat["float"]),
                   "int8_fp32_size": ratio(variants["qat_int8"]["tflite_bytes"], variants["float"]["tflite_bytes"]),
                   "qat_float_step_time": ratio(qat_fit["step_s"], float_fit["step_s"])},
        "accuracy_drop_points": {kind: _drop_points(variants["float"]["accuracy"], variants[kind]["accuracy"])
                                 for kind in ("ptq_int8", "qat_int8")},
        "config": dict(dataclasses.asdict(cfg), scheme=scheme_data),
        "training": {"float": float_fit["history"], "qat": qat_fit["history"],
                     "qat_recipe": {"epochs": cfg.qat_epochs, "learning_rate": cfg.qat_learning_rate,
                                    "warmup": cfg.qat_warmup, **schedule}},
        "errors": errors,
    }
    report_mod.write_report(report, out_dir)
    if cache:
        shutil.rmtree(os.path.dirname(cache), ignore_errors=True)  # every stage that reads it has finished
    return report


def qat_schedule(cfg):
    """The QAT schedule settings that differ from "off", checked, for the stage key and report.json."""
    out = {}
    if cfg.quant_delay:
        out["quant_delay"] = int(cfg.quant_delay)
    if cfg.freeze_bn is not None:
        out["freeze_bn"] = int(cfg.freeze_bn)
    if cfg.bit_schedule:
        out["bit_schedule"] = {str(k): v for k, v in training.BitSchedule(cfg.bit_schedule).schedule.items()}
    if cfg.distill:
        temperature, alpha = (float(v) for v in cfg.distill)
        training.Distiller.check_arguments(temperature, alpha)
        out["distill"] = {"temperature": temperature, "alpha": alpha}
    if cfg.bn_folding != "two_pass":
        from mobileqat.layers import FOLDINGS
        if cfg.bn_folding not in FOLDINGS:
            raise ValueError(f"bn_folding={cfg.bn_folding!r}: use one of {FOLDINGS}.")
        out["bn_folding"] = cfg.bn_folding
    return out


def _qat_callbacks(cfg):
    callbacks = []
    if cfg.quant_delay:
        callbacks.append(training.QuantizationDelay(cfg.quant_delay))
    if cfg.freeze_bn is not None:
        callbacks.append(training.FreezeBatchNorm(cfg.freeze_bn))
    if cfg.bit_schedule:
        callbacks.append(training.BitSchedule(cfg.bit_schedule, unit="epoch"))
    return callbacks


def _qat_trainee(qat, float_model, cfg):
    """(the model that training.fit trains,): the QAT model, set to ``cfg.bn_folding``, or with ``cfg.distill``
    a ``Distiller`` of it with the float model as teacher (the QAT model is what trains either way)."""
    training.set_bn_folding(qat, cfg.bn_folding)
    if cfg.distill:
        temperature, alpha = cfg.distill
        return (training.Distiller(qat, float_model, temperature=temperature, alpha=alpha),)
    return (qat,)


def _io_type(scheme, io_type):
    """The integer files' input/output type: ``io_type`` ("int8"/"uint8"), or "int16" when ``scheme`` has
    16-bit activations (TFLite int16x8: the PTQ baseline is then the converter's int16x8 PTQ too)."""
    default = scheme.default if isinstance(scheme, schemes.SchemeRules) else scheme
    if getattr(default, "activation_bits", 8) != 16:
        return io_type
    if io_type not in ("int8", "int16"):
        raise ValueError(f"scheme {default.name!r} has 16-bit activations: its files have int16 input/output, "
                         f"not {io_type}; leave io_type at its default.")
    return "int16"


def _scheme(given):
    """(QuantScheme or SchemeRules, plain data for the report) of ``RunConfig.scheme``: a preset by name,
    otherwise its fields / rules (and the file they were read from). The QAT stage is keyed by the
    content (``to_dict``), not by a file's path."""
    scheme = schemes.as_scheme_or_rules(given)
    data = scheme.to_dict()
    if isinstance(given, (str, os.PathLike)) and not (isinstance(given, str) and given in schemes.PRESETS):
        data = {"file": os.path.abspath(os.fspath(given)), **data}
    elif isinstance(given, str):
        data = given  # a preset, by name
    return scheme, data


def _counts(dataset):
    if isinstance(dataset, ImageFolderStream):
        return len(dataset.train_files), len(dataset.test_files)
    return len(dataset.x_train), len(dataset.y_test)


def _test_chunks(dataset, chunk_mb):
    """(x, y) numpy chunks of the test split: all of it for in-memory data; for a stream, decoded chunk
    by chunk, at most ``chunk_mb`` MB of float32 images each."""
    if not isinstance(dataset, ImageFolderStream):
        yield dataset.x_test, dataset.y_test
        return
    per_image = 4 * int(np.prod(dataset.input_shape))
    yield from dataset.chunks("test", max(1, int(chunk_mb * 2**20) // per_image))


def _cache_prefix(out_dir, data_key):
    """out_dir/cache/train-<key>: tf.data's cache of the decoded training images. Files of other data
    and those a killed run left (lock files, partial writes) are removed first: one run per folder."""
    folder = os.path.join(out_dir, "cache")
    os.makedirs(folder, exist_ok=True)
    name = f"train-{data_key[:16]}"
    for entry in os.listdir(folder):
        if not entry.startswith(name + ".") or "tempstate" in entry or entry.endswith(".lockfile"):
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    return os.path.join(folder, name)


def merge_validations(parts, weights):
    """One ``harness.validate`` result from results on consecutive chunks of the test set (``weights``:
    images per chunk). Accuracies, agreements, fractions and means: weighted means (exact: every chunk's
    numbers are means over its images); ``max_*``: the maximum; a runtime that failed on any chunk: its
    error; other values (file size, simulation kind, provenance): the first chunk's."""
    if len(parts) == 1:
        return parts[0]
    return _merge(parts, weights, "")


def _merge(values, weights, key):
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    values, weights = [v for v, _ in pairs], [w for _, w in pairs]
    first = values[0]
    if isinstance(first, dict):
        failed = next((v for v in values if isinstance(v, dict) and "error" in v), None)
        if failed is not None:
            return failed
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: _merge([v.get(k) for v in values], weights, k) for k in keys}
    if isinstance(first, bool) or not isinstance(first, (int, float)) or key == "tflite_bytes":
        return first
    if key.startswith("max"):
        return max(values)
    return float(np.average(values, weights=weights))


def model_file_info(model, path):
    """report.json's facts about the user's model file: path, sha256, output kind."""
    if os.path.isdir(path):
        h = hashlib.sha256()
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                h.update(os.fsencode(os.path.relpath(full, path)) + b"\0" + file_sha256(full).encode())
        digest = h.hexdigest()
    else:
        digest = file_sha256(path)
    return {"file": os.path.abspath(path), "sha256": digest,
            "output": "probabilities" if _outputs_probabilities(model) else "logits"}


def _outputs_probabilities(model):
    """True when the model's output layer applies softmax (else its outputs are taken as logits)."""
    layer = model.outputs[0]._keras_history.layer
    if isinstance(layer, keras.layers.Softmax):
        return True
    return getattr(getattr(layer, "activation", None), "__name__", None) == "softmax"


MODEL_FILE_FIX = ("save the trained float model with tf_keras (Keras 2; `import mobileqat` first, or "
                  "TF_USE_LEGACY_KERAS=1): model.save('model.keras') or model.save('model.h5')")


def load_model_file(path):
    """The user's trained float model for ``mobileqat run --model-file``: loaded with tf_keras (no
    compile), checked to take one image input (None, H, W, C) with fixed H, W >= 8 and C in (1, 3) and
    to give one (None, classes) output, and quantized once (``quantize``) so that every layer it refuses
    is known before any work. Returns (float model, its QAT model). Raises ValueError naming the file and
    the fix (a refusal lists every layer, as ``quantize`` does)."""
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise ValueError(f"model file {shown} does not exist; pass the trained float model: {MODEL_FILE_FIX}.")
    if not os.path.isdir(shown) and not shown.lower().endswith((".keras", ".h5", ".hdf5")):
        raise ValueError(f"model file {shown}: expected a .keras or .h5 file; {MODEL_FILE_FIX}.")
    keras3 = _keras3_version(shown)
    if keras3:
        raise ValueError(f"model file {shown} was saved by Keras {keras3}, which tf_keras (Keras 2) cannot read; fix: "
                         f"{MODEL_FILE_FIX}, e.g. rebuild the model with tf_keras and copy the weights "
                         "(new.set_weights(old.get_weights())).")
    try:
        model = keras.models.load_model(shown, compile=False)
    except Exception as e:  # noqa: BLE001 - any reason the file does not load means "cannot use it"
        why = " ".join(str(e).split()).split(" Full object config:")[0]
        why = why if len(why) <= 300 else why[:297] + "..."
        raise ValueError(f"model file {shown} cannot be loaded by tf_keras ({type(e).__name__}: {why}); fix: "
                         f"{MODEL_FILE_FIX}; a model with custom layers cannot be read by name here.") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"model file {shown} holds a {type(model).__name__}, not a Keras model; {MODEL_FILE_FIX}.")
    if len(getattr(model, "inputs", None) or []) == 1 and len(getattr(model, "outputs", None) or []) == 1:
        shape = tuple(model.inputs[0].shape)
        if len(shape) != 4 or any(d is None for d in shape[1:]) or min(shape[1:3]) < 8 or shape[3] not in (1, 3):
            raise ValueError(f"model file {shown}: the model takes input shape {shape}; mobileqat needs images "
                             "(None, H, W, C) with fixed H, W >= 8 and C = 3 (RGB) or 1 (grayscale); fix: rebuild "
                             "it on keras.Input((H, W, C)) and copy the weights (new.set_weights(old.get_weights())).")
        out = tuple(model.outputs[0].shape)
        if len(out) != 2 or out[1] is None or out[1] < 2:
            raise ValueError(f"model file {shown}: the model outputs shape {out}; mobileqat needs class scores "
                             "(None, classes) with classes >= 2 (softmax probabilities or logits); fix: end the "
                             "model in Dense(classes) [+ softmax].")
    try:
        qat = quantize(model, "w8a8")
    except (ValueError, TypeError) as e:
        raise ValueError(f"model file {shown}: {e}") from e
    return model, qat


def _keras3_version(path):
    """The Keras version in a .keras file's metadata.json when it is 3 or later, else None."""
    import json
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            version = str(json.loads(z.read("metadata.json")).get("keras_version", ""))
    except Exception:  # noqa: BLE001 - not a readable .keras zip: let load_model say why
        return None
    return version if version[:1].isdigit() and int(version.split(".")[0]) >= 3 else None


def check_model_fits(model, dataset, path):
    """ValueError naming the file when the model's classes or input shape do not match the data."""
    classes = int(model.outputs[0].shape[-1])
    if classes != dataset.classes:
        raise ValueError(f"model file {path} has {classes} output classes but the data folder {dataset.name!r} has "
                         f"{dataset.classes} class sub-folders ({', '.join(map(str, dataset.class_names))}); fix: "
                         "pass the folder the model was trained on (one sub-folder per class, in the order the "
                         "model's outputs follow, sorted by name).")
    if tuple(model.inputs[0].shape[1:]) != tuple(dataset.input_shape):
        raise ValueError(f"model file {path} takes {tuple(model.inputs[0].shape[1:])} images but the data is read "
                         f"at {tuple(dataset.input_shape)}; read it at the model's input size.")


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
