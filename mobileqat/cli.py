"""The ``mobileqat`` command: demo, run, compare, sensitivity, auto, validate, debug, bench, export, device-check,
coverage.

``device-check`` is dispatched before anything else is imported: it needs numpy, Pillow and ai-edge-litert
only (``mobileqat.device_check``), never TensorFlow."""
import argparse
import json
import math
import os
import sys


def number(kind, low=None, high=None):
    """An argparse type: ``kind`` (int or float) in [low, high], finite; otherwise a message naming
    the accepted range (argparse prefixes the flag and exits 2)."""
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or \
                (low is not None and value < low) or (high is not None and value > high):
            bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                              f"<= {high}" if high is not None else "") if b)
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a finite number'}"
                                             f"{' ' + bounds if bounds else ''}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


COUNT = number(int, 1)                  # images, epochs, runs, batch size
SEED = number(int, 0, 2**32 - 1)
THREADS = number(int, 1, 256)
SIZE = number(int, 8, 2048)             # input side in pixels
RATE = number(float, 1e-12, 10.0)       # learning rates
FRACTION = number(float, 0.0, 1.0)


def _distill_arg(text):
    """'T,ALPHA' -> (T, ALPHA) for --distill."""
    try:
        temperature, alpha = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T,ALPHA (e.g. 4,0.5), got {text!r}") from None
    if not (math.isfinite(temperature) and temperature > 0 and 0.0 <= alpha <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a temperature > 0 and ALPHA in [0, 1], got {text!r}")
    return (temperature, alpha)


def _add_run_options(p, defaults):
    p.add_argument("--out", required=True, help="output folder (report.json, .tflite files, models)")
    from mobileqat.architectures import MODELS, takes_alpha
    p.add_argument("--model", default=None, choices=list(MODELS),
                   help=f"built-in architecture (default {defaults.model})")
    p.add_argument("--alpha", type=number(float, 1e-3, 10.0), default=None,
                   help=f"width multiplier of {', '.join(m for m in MODELS if takes_alpha(m))} "
                        f"(default {defaults.alpha})")
    p.add_argument("--epochs", type=COUNT, default=defaults.epochs, help="float training epochs")
    p.add_argument("--qat-epochs", type=COUNT, default=defaults.qat_epochs, help="QAT fine-tuning epochs")
    p.add_argument("--batch-size", type=COUNT, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=RATE, default=defaults.learning_rate,
                   help="float training peak learning rate (Adam, cosine decay to 0)")
    p.add_argument("--qat-learning-rate", type=RATE, default=defaults.qat_learning_rate,
                   help="QAT fine-tuning peak learning rate")
    p.add_argument("--qat-warmup", type=number(float, 0.0, 0.99), default=defaults.qat_warmup,
                   help="fraction of the QAT steps with a linear learning-rate warm-up (default %(default)s)")
    p.add_argument("--quant-delay", type=number(int, 0), default=defaults.quant_delay, metavar="STEPS",
                   help="QAT steps trained float (fake quantization off, ranges recorded) before quantizing")
    p.add_argument("--freeze-bn", type=number(int, 0), default=defaults.freeze_bn, metavar="STEP",
                   help="QAT step from which folded batch norms use their moving statistics (one convolution)")
    p.add_argument("--bit-schedule", default=defaults.bit_schedule, metavar="BITS:EPOCH,...",
                   help="weight bit width by QAT epoch, e.g. 8:0,6:1,4:2 (8-bit in epoch 0, 6-bit in 1, 4-bit from 2); "
                        "it ends at the scheme's weight bits (e.g. --scheme w4a8)")
    p.add_argument("--distill", type=_distill_arg, default=defaults.distill, metavar="T,ALPHA",
                   help="distil the float model into the QAT model: temperature T > 0, hard-label weight ALPHA in "
                        "[0, 1], e.g. 4,0.5")
    p.add_argument("--bn-folding", choices=["two_pass", "single_conv"], default=defaults.bn_folding,
                   help="folded conv+BN in QAT training: two_pass (exact batch statistics, two convolutions) or "
                        "single_conv (one convolution, PyTorch's approximate form). Default %(default)s")
    p.add_argument("--scheme", default=defaults.scheme, metavar="w8a8|w4a8|w8a16|RULES.json",
                   help="QAT scheme: a preset (w8a8: int8 weights and activations; w4a8: 4-bit per-channel weights "
                        "in int8 tensors, int8 activations; w8a16: TFLite int16x8, int16 activations and "
                        "input/output, int8 weights; its PTQ baseline is the converter's int16x8) or a JSON file of mixed-precision rules, e.g. "
                        '{"default": "w4a8", "rules": [{"match": {"position": "first"}, "scheme": "w8a8"}, '
                        '{"match": {"position": "last"}, "scheme": "w8a8"}]} (match keys: name (glob), regex, '
                        "type, position). Default %(default)s")
    p.add_argument("--io-type", default=defaults.io_type, choices=["int8", "uint8"],
                   help="input/output type of the integer files (a w8a16 scheme makes them int16). "
                        "Default %(default)s")
    p.add_argument("--threads", type=THREADS, default=defaults.threads, help="interpreter threads")
    p.add_argument("--bench-runs", type=COUNT, default=defaults.bench_runs)
    p.add_argument("--seed", type=SEED, default=defaults.seed)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--golden", type=number(int, 0), default=256,
                   help="golden images of OUT/package, the deployment package written at the end (0: none)")


def _config(args, **extra):
    from mobileqat.pipeline import RunConfig
    d = RunConfig()

    def given(name):
        value = getattr(args, name)
        return getattr(d, name) if value is None else value
    model = extra.get("model", given("model"))
    if model is not None and args.alpha is not None:
        from mobileqat.architectures import takes_alpha
        if not takes_alpha(model):
            raise ValueError(f"--alpha {args.alpha} with --model {model}: {model} has no width multiplier; drop "
                             "--alpha (it applies to the MobileNets).")
    fields = dict(model=given("model"), alpha=given("alpha"), epochs=given("epochs"), qat_epochs=args.qat_epochs,
                  batch_size=args.batch_size, learning_rate=given("learning_rate"),
                  qat_learning_rate=args.qat_learning_rate, io_type=args.io_type, threads=args.threads,
                  bench_runs=args.bench_runs, seed=args.seed, verbose=0 if args.quiet else 1, scheme=args.scheme,
                  qat_warmup=args.qat_warmup, quant_delay=args.quant_delay, freeze_bn=args.freeze_bn,
                  bit_schedule=args.bit_schedule, distill=args.distill, bn_folding=args.bn_folding)
    from mobileqat.schemes import as_scheme_or_rules
    as_scheme_or_rules(args.scheme)  # an unknown preset or a bad rules file stops here, before any work
    cfg = RunConfig(**{**fields, **extra})
    from mobileqat.pipeline import qat_schedule
    qat_schedule(cfg)  # so does a bad --bit-schedule
    return cfg


def _add_pixel_options(p):
    from mobileqat.data import PIXELS
    p.add_argument("--pixels", choices=PIXELS, default="-1..1",
                   help="the pixel scaling the model expects, x in 0..255: -1..1 (x/127.5 - 1, the built-in models), "
                        "0..1 (x/255), 0..255 (x), mean_std ((x - mean) / std with --mean/--std)")
    p.add_argument("--mean", type=number(float), nargs="+", metavar="M",
                   help="per-channel mean in 0..255 units for --pixels mean_std (one value, or one per channel)")
    p.add_argument("--std", type=number(float), nargs="+", metavar="S",
                   help="per-channel std in 0..255 units for --pixels mean_std (ImageNet: 58.395 57.12 57.375)")


def _finish(report, out):
    from mobileqat.report import summary_lines
    print("\n".join(summary_lines(report)))
    print(f"report: {os.path.join(out, 'report.json')} and report.md")
    for k, v in report.get("errors", {}).items():
        print(f"runtime error ({k}): {v}", file=sys.stderr)
    unrun = [kind for kind, v in report["variants"].items()
             if v.get("accuracy") is None and v.get("accuracy_reference") is None]
    if unrun:  # no runtime could run these files: the run did not do its job
        print(f"mobileqat: failed: no runtime ran {', '.join(unrun)} (errors above)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args):
    from mobileqat.data import synthetic_shapes
    from mobileqat.pipeline import run_pipeline
    cfg = _config(args)  # flag errors before the images are drawn
    ds = synthetic_shapes(n_train=args.train, n_test=args.test, image_size=args.input_size, seed=args.seed,
                          difficulty=args.difficulty)
    return _package(_finish(run_pipeline(ds, args.out, cfg), args.out), args, ds)


def _package(code, args, ds):
    """After a run that succeeded: OUT/package (``mobileqat.package``), unless --golden 0."""
    if code != 0 or not args.golden:
        return code
    import json as _json
    from mobileqat.package import write_run_package
    with open(os.path.join(args.out, "report.json")) as f:
        report = _json.load(f)
    write_run_package(args.out, ds, report, golden=args.golden, threads=args.threads, log=print)
    return 0


def cmd_run(args):
    from mobileqat.data import image_folder_stream
    from mobileqat.pipeline import check_model_fits, load_model_file, run_pipeline
    pixels = dict(pixels=args.pixels, mean=args.mean, std=args.std)
    extra = dict(augment=None if args.augment is None else (tuple(args.augment) or True), cache=args.cache)
    if extra["augment"] is True:
        from mobileqat.data import AUGMENTATIONS
        extra["augment"] = AUGMENTATIONS
    float_model = qat_model = None
    if args.model_file:
        fixed = [flag for flag, value in (("--model", args.model), ("--alpha", args.alpha), ("--epochs", args.epochs),
                                          ("--learning-rate", args.learning_rate), ("--input-size", args.input_size),
                                          ("--channels", args.channels)) if value is not None]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} with --model-file {args.model_file}: the model file fixes the "
                             "architecture and the input size and channels, and no float training runs (only QAT: "
                             "--qat-epochs, --qat-learning-rate); drop " + ("it." if len(fixed) == 1 else "them."))
        float_model, qat_model = load_model_file(args.model_file)
        h, w, c = (int(d) for d in float_model.inputs[0].shape[1:])
        ds = image_folder_stream(args.data, image_size=(h, w), channels=c, seed=args.seed, **pixels)
        check_model_fits(float_model, ds, args.model_file)
        cfg = _config(args, model=None, alpha=None, epochs=None, learning_rate=None,  # not used: no float training
                      model_file=os.path.abspath(args.model_file), **extra)
    else:
        ds = image_folder_stream(args.data, image_size=args.input_size or 32, channels=args.channels or 3,
                                 seed=args.seed, **pixels)
        cfg = _config(args, **extra)
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable files, e.g. {ds.skipped[0][0]}: {ds.skipped[0][1]}",
              file=sys.stderr)
    return _package(_finish(run_pipeline(ds, args.out, cfg, float_model=float_model, qat_model=qat_model), args.out),
                    args, ds)


def _eval_data(args):
    from types import SimpleNamespace

    from mobileqat.data import image_folder_stream, synthetic_shapes
    if args.data:
        stream = image_folder_stream(args.data, image_size=args.input_size, channels=args.channels, seed=args.seed,
                                     pixels=args.pixels, mean=args.mean, std=args.std)
        x_test, y_test = stream.arrays("test")  # the test split only: the training images are never held
        return SimpleNamespace(x_test=x_test, y_test=y_test)
    if args.pixels != "-1..1" or args.mean or args.std:
        raise ValueError("--pixels/--mean/--std apply to --data (an image folder); the synthetic test split is "
                         "scaled to -1..1, as the built-in models expect. Pass --data, or drop them.")
    return synthetic_shapes(n_train=0, n_test=args.test, image_size=args.input_size, seed=args.seed)


def cmd_validate(args):
    from mobileqat.harness import validate
    from mobileqat.quantize import load_qat_model
    ds = _eval_data(args)
    model = load_qat_model(args.keras_model) if args.keras_model else None
    result = validate(args.tflite, ds.x_test, ds.y_test, model=model, runtimes=args.runtimes,
                      threads=args.threads)
    print(json.dumps(result, indent=2))
    failures = []
    for name, r in result["runtimes"].items():
        if "error" in r:
            failures.append(f"{name}: {r['error']}")
            continue
        kind = "float" if args.simulation == "float" else r.get("simulation", "float")
        sim = r.get("float_sim", r) if kind == "float" else r
        label = f"{name} vs the {kind} simulation"
        if args.min_agreement is not None and sim.get("top1_agreement", 1.0) < args.min_agreement:
            failures.append(f"{label}: top-1 agreement {sim['top1_agreement']:.4f} < --min-agreement "
                            f"{args.min_agreement}")
        if args.max_lsb is not None and sim.get("max_lsb_diff", 0) > args.max_lsb:
            failures.append(f"{label}: max difference {sim['max_lsb_diff']} LSB > --max-lsb {args.max_lsb}")
    if failures:
        print("validation FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def cmd_debug(args):
    from mobileqat import debug
    from mobileqat.quantize import load_qat_model
    ds = _eval_data(args)
    result = debug.debug_fidelity(load_qat_model(args.keras_model), args.tflite, ds.x_test[:args.samples])
    print(debug.format_table(result))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        debug.write_json(result, os.path.join(args.out, "fidelity_per_layer.json"))
        png = debug.plot(result, os.path.join(args.out, "fidelity_per_layer.png"))
        print(f"written: {os.path.join(args.out, 'fidelity_per_layer.json')}" + (f" and {png}" if png else ""))
    return 0


def cmd_bench(args):
    from mobileqat import harness
    if len(args.tflite) > 2:
        raise ValueError(f"bench takes one .tflite, or two to compare side by side; got {len(args.tflite)}.")
    if len(args.tflite) == 2:
        result = harness.benchmark_pair(*args.tflite, runtimes=args.runtimes, threads=args.threads, runs=args.runs,
                                        warmup=args.warmup)
        if args.json:
            from mobileqat.export import write_atomic
            write_atomic(args.json, json.dumps(result, indent=2).encode())
        print(harness.pair_table(result), end="")
        return 1 if result["errors"] else 0
    results = [harness.benchmark(args.tflite[0], runtimes=args.runtimes, threads=n, runs=args.runs,
                                 warmup=args.warmup) for n in args.threads]
    result = results[0] if len(results) == 1 else {"threads": args.threads, "per_threads": results}
    if args.json:
        from mobileqat.export import write_atomic
        write_atomic(args.json, json.dumps(result, indent=2).encode())
    print(json.dumps(result, indent=2))
    return _failed(args.tflite[0], [f for r in results for f in harness.failed_runtimes(r)])


def cmd_export(args):
    from mobileqat.package import export_package
    from mobileqat.quantize import load_qat_model
    if not os.path.isfile(args.qat_model):
        raise FileNotFoundError(f"{args.qat_model}: no such QAT model file; pass the .h5 a run wrote "
                                "(e.g. OUT/qat_model.h5).")
    model = load_qat_model(args.qat_model)
    ds = _data_for(model, args, args.qat_model, n_train=0, n_test=args.golden)
    report = None
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
    manifest = export_package(model, args.out, ds, io_type=args.io_type, golden=args.golden, report=report,
                              threads=args.threads, log=print)
    v = manifest["validation"]
    twin = v["integer_twin"]
    print(f"golden accuracy: reference {100 * v['golden']['reference']['accuracy']:.2f} %, XNNPACK "
          f"{100 * v['golden']['xnnpack']['accuracy']:.2f} %; integer twin vs runtimes: " + (
              twin["integer_path_error"] if "integer_path_error" in twin else
              ", ".join(f"{k} max {r.get('max_lsb_diff')} LSB" for k, r in twin.items())))
    return 0


def cmd_device_check(args):
    from mobileqat import device_check
    return device_check.main(args.rest)


def cmd_coverage(args):
    from mobileqat import coverage
    models = args.models or coverage.MODELS
    rows = coverage.run(args.out, models, tools=args.tools, again=args.again, timeout=args.timeout,
                        log=lambda m: print(m, flush=True))
    text = coverage.table(rows)
    from mobileqat.export import write_atomic
    write_atomic(os.path.join(args.out, "coverage.md"), text.encode())
    print(text)
    print(f"written: {os.path.join(args.out, 'coverage.md')} and one JSON per model in {args.out}")
    return 0


def cmd_compare(args):
    from mobileqat.compare import CompareConfig, check_variants, compare
    from mobileqat.data import image_folder_stream, synthetic_shapes
    from mobileqat.pipeline import check_model_fits, load_model_file
    variants = check_variants(args.variants.split(","))  # a bad name stops here, before any work
    fields = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                  qat_epochs=args.qat_epochs, qat_learning_rate=args.qat_learning_rate, qat_warmup=args.qat_warmup,
                  freeze_bn=args.freeze_bn, distill=args.distill, ptq_method=args.ptq_method,
                  ptq_bias_correction=not args.no_bias_correction, calibration_images=args.calibration_images,
                  twin_images=args.twin_images, bench_runs=args.bench_runs, threads=args.threads, seed=args.seed,
                  verbose=0 if args.quiet else 1, variants=variants)
    float_model = None
    if args.model_file:
        fixed = [flag for flag, value in (("--model", args.model), ("--alpha", args.alpha),
                                          ("--input-size", args.input_size), ("--channels", args.channels))
                 if value is not None]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} with --model-file {args.model_file}: the model file fixes the "
                             "architecture, input size and channels; drop " + ("it." if len(fixed) == 1 else "them."))
        if not args.data:
            raise ValueError(f"--model-file {args.model_file} needs --data IMAGE_DIR (the folder it was trained on).")
        float_model, _ = load_model_file(args.model_file)
        h, w, c = (int(d) for d in float_model.inputs[0].shape[1:])
        ds = image_folder_stream(args.data, image_size=(h, w), channels=c, seed=args.seed, pixels=args.pixels,
                                 mean=args.mean, std=args.std)
        check_model_fits(float_model, ds, args.model_file)
        cfg = CompareConfig(model=None, alpha=None, model_file=os.path.abspath(args.model_file), **fields)
    else:
        model = args.model or "mobilenet_v2"
        from mobileqat.architectures import takes_alpha
        if args.alpha is not None and not takes_alpha(model):
            raise ValueError(f"--alpha {args.alpha} with --model {model}: {model} has no width multiplier; "
                             "drop --alpha.")
        cfg = CompareConfig(model=model, alpha=0.35 if args.alpha is None else args.alpha, **fields)
        if args.data:
            ds = image_folder_stream(args.data, image_size=args.input_size or 32, channels=args.channels or 3,
                                     seed=args.seed, pixels=args.pixels, mean=args.mean, std=args.std)
        else:
            if args.pixels != "-1..1" or args.mean or args.std:
                raise ValueError("--pixels/--mean/--std apply to --data (an image folder); the built-in demo data is "
                                 "scaled to -1..1. Pass --data, or drop them.")
            ds = synthetic_shapes(n_train=args.train, n_test=args.test, image_size=args.input_size or 32,
                                  channels=args.channels or 3, seed=args.seed, difficulty=args.difficulty)
    result = compare(ds, args.out, cfg, float_model=float_model)
    with open(os.path.join(args.out, "compare.md")) as f:
        print(f.read(), end="")
    print(f"written: {os.path.join(args.out, 'compare.json')} and compare.md")
    failed = [k for k, v in result["variants"].items() if v.get("accuracy") is None]
    if failed:
        print(f"mobileqat: failed: XNNPACK could not run {', '.join(failed)} (compare.md: Errors)", file=sys.stderr)
        return 1
    return 0


def cmd_sensitivity(args):
    import numpy as np

    from mobileqat import sensitivity as S
    from mobileqat.data import calibration_subset, image_folder_stream, synthetic_shapes
    from mobileqat.schemes import get_scheme
    S._check_budget(args.budget)
    for flag, scheme in (("--high", args.high), ("--low", args.low)):
        try:
            get_scheme(scheme)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from e
    if get_scheme(args.low).weight_bits >= get_scheme(args.high).weight_bits:
        raise ValueError(f"--low {args.low} must have fewer weight bits than --high {args.high} (e.g. --high w8a8 "
                         "--low w4a8).")
    if args.data is None and (args.pixels != "-1..1" or args.mean or args.std):
        raise ValueError("--pixels/--mean/--std apply to --data (an image folder); the synthetic shapes are scaled "
                         "to -1..1. Pass --data, or drop them.")
    pixels = dict(pixels=args.pixels, mean=args.mean, std=args.std)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if args.model_file:
        if args.model or args.alpha is not None or args.epochs is not None:
            raise ValueError(f"--model/--alpha/--epochs with --model-file {args.model_file}: the file is the trained "
                             "model; drop them.")
        from mobileqat.pipeline import check_model_fits, load_model_file
        model, _ = load_model_file(args.model_file)
        h, w, c = (int(d) for d in model.inputs[0].shape[1:])
        ds = (image_folder_stream(args.data, (h, w), c, seed=args.seed, **pixels) if args.data else
              synthetic_shapes(n_train=args.train, n_test=args.test, image_size=h, seed=args.seed))
        check_model_fits(model, ds, args.model_file)
        source = {"model_file": os.path.abspath(args.model_file)}
    else:
        size = args.input_size or 32
        ds = (image_folder_stream(args.data, size, 3, seed=args.seed, **pixels) if args.data else
              synthetic_shapes(n_train=args.train, n_test=args.test, image_size=size, seed=args.seed))
        model, source = _sensitivity_float_model(args, ds, log)
    x, y = ds.arrays("test") if hasattr(ds, "arrays") else (ds.x_test, ds.y_test)
    calib = calibration_subset(ds, args.calibration, args.seed)
    float_acc = float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))
    log(f"float model: accuracy {100 * float_acc:.2f} % on {len(y)} test images; calibrating the baseline")
    run = S.SensitivityRun(model, calib, x, y, args.high, args.low, args.method, args.bias_correction, args.runtime,
                           log=log)
    extra = {"model": {"name": model.name, **source}, "data": {"name": ds.name, "test": int(len(y)),
             "calibration": int(len(calib))}, "float_accuracy": float_acc}
    report = S.write_sensitivity(run, args.budget, args.out, export=not args.no_export, extra=extra)
    print(S.format_table(report, report["plan"]))
    f = report.get("plan_file")
    if f:
        print(f"plan file: {f['bytes']} bytes ({f['gzip_bytes']} gzip), accuracy {100 * f['accuracy']:.2f} % on "
              f"{args.runtime}, {f['max_lsb_vs_twin']} LSB from the twin")
    print(f"written: {os.path.join(args.out, 'sensitivity.json')}, plan.json (rules), sensitivity.png")
    return 0


def _sensitivity_float_model(args, ds, log):
    """--model NAME: trained here for --epochs (kept as OUT/float_model.keras and reused by a rerun with the
    same model, data and training flags)."""
    from mobileqat import architectures
    from mobileqat._tf import keras
    from mobileqat.export import save_keras_model, write_atomic
    from mobileqat.stages import data_fingerprint, stage_key
    from mobileqat.training import fit
    name = args.model or "mobilenet_v2"
    alpha = args.alpha if args.alpha is not None else (0.35 if architectures.takes_alpha(name) else None)
    epochs = args.epochs if args.epochs is not None else 6
    key = stage_key(model=name, alpha=alpha, epochs=epochs, lr=args.learning_rate, seed=args.seed,
                    data=ds.fingerprint() if hasattr(ds, "fingerprint") else data_fingerprint(ds))
    path, meta = os.path.join(args.out, "float_model.keras"), os.path.join(args.out, "float_model.json")
    source = {"builder": name, "alpha": alpha, "epochs": epochs, "learning_rate": args.learning_rate,
              "file": os.path.abspath(path)}
    try:
        with open(meta) as f:
            reuse = json.load(f).get("key") == key and os.path.exists(path)
    except (OSError, ValueError):
        reuse = False
    if reuse:
        log(f"float model: reusing {path}")
        return keras.models.load_model(path), source
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    kwargs = {"alpha": alpha} if alpha is not None else {}
    model = architectures.build(name, ds.input_shape, ds.classes, **kwargs)
    log(f"float model: training {name} for {epochs} epochs")
    if hasattr(ds, "dataset"):
        fit(model, ds.dataset("train", seed=args.seed), None, epochs, learning_rate=args.learning_rate,
            seed=args.seed, verbose=0 if args.quiet else 2)
    else:
        fit(model, ds.x_train, ds.y_train, epochs, learning_rate=args.learning_rate, seed=args.seed,
            verbose=0 if args.quiet else 2)
    save_keras_model(model, path)
    write_atomic(meta, json.dumps({"key": key}).encode())
    return model, source


def _data_for(model, args, what, **shapes):
    """The data a model of fixed input (H, W, C) takes: --data DIR read at that size, or the built-in shapes
    (``synthetic_shapes`` keyword arguments ``shapes``; square inputs only). ``what`` names the model's file."""
    from mobileqat.data import image_folder_stream, synthetic_shapes
    h, w, c = (int(d) for d in model.inputs[0].shape[1:])
    if args.data:
        return image_folder_stream(args.data, image_size=(h, w), channels=c, seed=args.seed, pixels=args.pixels,
                                   mean=args.mean, std=args.std)
    if args.pixels != "-1..1" or args.mean or args.std:
        raise ValueError("--pixels/--mean/--std apply to --data (an image folder); the built-in shapes are scaled "
                         "to -1..1. Pass --data, or drop them.")
    if h != w:
        raise ValueError(f"{what} takes {h}x{w} images; the built-in shapes are square: pass --data IMAGE_DIR.")
    return synthetic_shapes(image_size=h, channels=c, seed=args.seed, **shapes)


def _user_model_and_data(args):
    """--model-file M with --data DIR (or, without --data, the built-in shapes at M's input size): (model, data)."""
    from mobileqat.pipeline import check_model_fits, load_model_file
    model, _ = load_model_file(args.model_file)
    ds = _data_for(model, args, f"--model-file {args.model_file}", n_train=args.train, n_test=args.test,
                   difficulty=args.difficulty)
    check_model_fits(model, ds, args.model_file)
    return model, ds


def cmd_auto(args):
    from mobileqat.ladder import LadderConfig, auto, check_config
    cfg = LadderConfig(budget=args.budget, scheme=args.scheme, methods=tuple(args.methods),
                       calibration_images=args.calibration_images, selection_images=args.selection_images,
                       adaround_iters=args.adaround_iters, qat_epochs=args.qat_epochs,
                       qat_learning_rate=args.qat_learning_rate, qat_warmup=args.qat_warmup, batch_size=args.batch_size,
                       twin_images=args.twin_images, bench_runs=args.bench_runs, threads=args.threads, seed=args.seed,
                       verbose=0 if args.quiet else 1, model_file=os.path.abspath(args.model_file))
    check_config(cfg)  # a bad setting stops here, before the model and data are read
    model, ds = _user_model_and_data(args)
    result = auto(ds, args.out, model, cfg)
    with open(os.path.join(args.out, "ladder.md")) as f:
        print(f.read(), end="")
    print(f"written: {os.path.join(args.out, 'model.tflite')}, report.json, ladder.json")
    if result["chosen"] is None:
        print(f"mobileqat: no rung meets the budget of {args.budget} points; model.tflite is the closest "
              f"({result.get('closest')})", file=sys.stderr)
        return 1
    return 0


def _failed(path, failures):
    """Exit code 1 with one line per failure on stderr, 0 when there is none."""
    if failures:
        print(f"mobileqat: {path}: " + "\n  ".join(["could not run on every runtime asked for:"] + failures),
              file=sys.stderr)
        return 1
    return 0


RUNTIMES = ("reference", "builtin", "xnnpack")


def build_parser():
    from mobileqat.pipeline import RunConfig
    d = RunConfig()
    parser = argparse.ArgumentParser(prog="mobileqat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="whole pipeline on the built-in synthetic shapes data")
    _add_run_options(p, d)
    p.add_argument("--train", type=COUNT, default=10000, help="training images")
    p.add_argument("--test", type=COUNT, default=1000, help="test images")
    p.add_argument("--input-size", type=SIZE, default=32)
    p.add_argument("--difficulty", type=number(float, 0.0, 100.0), default=1.3, help="clutter/noise/size spread of the shapes")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="whole pipeline on a folder of images, one sub-folder per class; with "
                                   "--model-file: QAT fine-tune of your trained float model")
    _add_run_options(p, d)
    p.add_argument("--data", required=True, help="image folder: DATA/<class>/<image> (read on demand, never "
                                                 "held in memory whole)")
    p.add_argument("--model-file", help="your trained float model (.keras or .h5, saved with tf_keras): no float "
                                        "training; it is quantized, QAT-fine-tuned, exported and compared with its "
                                        "PTQ file; input size and channels come from the model")
    p.add_argument("--input-size", type=SIZE, default=None, help="image side in pixels (default 32; from the "
                                                                 "model with --model-file)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default 3; from the model with "
                                                                              "--model-file")
    _add_pixel_options(p)
    from mobileqat.data import AUGMENTATIONS
    p.add_argument("--augment", nargs="*", choices=AUGMENTATIONS, default=None,
                   help="augment the training images (never the test split): all of flip, crop, brightness, or "
                        "the ones named")
    p.add_argument("--cache", action="store_true", help="cache the decoded training images in OUT/cache after "
                                                         "the first epoch (removed when the run ends)")
    p.set_defaults(func=cmd_run, model=None, alpha=None, epochs=None, learning_rate=None)

    p = sub.add_parser("validate", help="run a .tflite on reference kernels and XNNPACK, compare with Keras")
    p.add_argument("tflite")
    p.add_argument("--keras-model", help="the QAT model (.h5) to compare with (e.g. OUT/qat_model.h5)")
    p.add_argument("--data", help="image folder (default: the synthetic test split)")
    p.add_argument("--input-size", type=SIZE, default=32)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--test", type=COUNT, default=1000)
    p.add_argument("--seed", type=SEED, default=0)
    _add_pixel_options(p)
    p.add_argument("--runtimes", nargs="+", default=["reference", "xnnpack"], choices=RUNTIMES)
    p.add_argument("--threads", type=THREADS, default=1)
    p.add_argument("--min-agreement", type=FRACTION, default=None,
                   help="fail (exit 1) when top-1 agreement with the Keras model is below this fraction")
    p.add_argument("--max-lsb", type=number(int, 0), default=None,
                   help="fail (exit 1) when an output code differs from the Keras model's by more than this")
    p.add_argument("--simulation", choices=["integer", "float"], default="integer",
                   help="which simulation the thresholds apply to: the QAT model's integer-exact path (falls "
                        "back to float where the model cannot be lowered) or its float fake-quant forward pass")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("debug", help="layer-by-layer comparison of the Keras QAT model with the .tflite")
    p.add_argument("tflite")
    p.add_argument("--keras-model", required=True, help="the QAT model (.h5), e.g. OUT/qat_model.h5")
    p.add_argument("--data", help="image folder (default: the synthetic test split)")
    p.add_argument("--input-size", type=SIZE, default=32)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--test", type=COUNT, default=1000)
    p.add_argument("--samples", type=COUNT, default=64, help="images to run through both")
    p.add_argument("--seed", type=SEED, default=0)
    _add_pixel_options(p)
    p.add_argument("--out", help="folder for fidelity_per_layer.json (and .png with matplotlib)")
    p.set_defaults(func=cmd_debug)

    p = sub.add_parser("bench", help="latency (median and p90 of repeated invokes) and size of a .tflite, or of "
                                      "two side by side (A B: B/A ratios measured in the same run)")
    p.add_argument("tflite", nargs="+", help="one file, or two to compare (e.g. float.tflite qat_int8.tflite)")
    p.add_argument("--runtimes", nargs="+", default=["xnnpack"], choices=RUNTIMES)
    p.add_argument("--threads", type=THREADS, nargs="+", default=[1], help="one or more thread counts, e.g. 1 2 4")
    p.add_argument("--runs", type=COUNT, default=100)
    p.add_argument("--warmup", type=number(int, 0), default=10, help="invokes before timing")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="export a QAT model (.h5) to a deployment package: model.tflite, labels.txt, "
                                      "manifest.json, golden/ (README: Deployment package)")
    p.add_argument("qat_model", help="the QAT model (.h5), e.g. OUT/qat_model.h5")
    p.add_argument("--out", required=True, help="package folder to write (replaced only if it is a package)")
    p.add_argument("--data", help="image folder DATA/<class>/<image> for labels and golden images (default: the "
                                  "synthetic shapes test split)")
    _add_pixel_options(p)
    p.add_argument("--golden", type=COUNT, default=256, help="golden images (from the test split)")
    p.add_argument("--report", help="report.json of the run, for the manifest's test-set numbers")
    p.add_argument("--io-type", default=None, choices=["int8", "uint8", "int16"],
                   help="input/output type of the file (default: int16 for a w8a16 model, int8 otherwise)")
    p.add_argument("--threads", type=THREADS, default=1)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("device-check", add_help=False, help="check a package on this device (numpy, Pillow, "
                                                            "ai-edge-litert only): `mobileqat device-check -h`")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_device_check)

    from mobileqat.compare import DEFAULT_VARIANTS, VARIANTS
    from mobileqat.compare import CompareConfig
    c = CompareConfig()
    p = sub.add_parser("compare", help="one float model, every quantized variant (PTQ/QAT, W8A8/W4A8, LSQ, "
                                       "distillation, mixed): accuracy on XNNPACK, bytes, gzip bytes, latency, "
                                       "train step time, twin LSB, in OUT/compare.json and compare.md")
    p.add_argument("--out", required=True, help="output folder (compare.json, compare.md, one .tflite per variant); "
                                                "a rerun skips the variants already measured")
    p.add_argument("--data", help="image folder DATA/<class>/<image> (default: the built-in synthetic shapes)")
    p.add_argument("--model-file", help="your trained float model (.keras or .h5, tf_keras): no float training; "
                                        "needs --data")
    from mobileqat.architectures import MODELS as _MODELS
    p.add_argument("--model", default=None, choices=list(_MODELS), help=f"built-in architecture (default {c.model})")
    p.add_argument("--alpha", type=number(float, 1e-3, 10.0), default=None,
                   help=f"width multiplier of the MobileNets (default {c.alpha})")
    p.add_argument("--input-size", type=SIZE, default=None, help="image side in pixels (default 32)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default 3")
    p.add_argument("--train", type=COUNT, default=10000, help="demo data: training images")
    p.add_argument("--test", type=COUNT, default=1000, help="demo data: test images")
    p.add_argument("--difficulty", type=number(float, 0.0, 100.0), default=1.3,
                   help="demo data: clutter/noise/size spread of the shapes (higher: harder)")
    _add_pixel_options(p)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all but ptq_w8a8_mq)")
    p.add_argument("--epochs", type=COUNT, default=c.epochs, help="float training epochs")
    p.add_argument("--batch-size", type=COUNT, default=c.batch_size)
    p.add_argument("--learning-rate", type=RATE, default=c.learning_rate, help="float training peak learning rate")
    p.add_argument("--qat-epochs", type=COUNT, default=c.qat_epochs, help="QAT epochs of each QAT variant")
    p.add_argument("--qat-learning-rate", type=RATE, default=c.qat_learning_rate)
    p.add_argument("--qat-warmup", type=number(float, 0.0, 0.99), default=c.qat_warmup)
    p.add_argument("--freeze-bn", type=number(int, 0), default=None, metavar="STEP",
                   help="QAT step from which folded batch norms use moving statistics (step time is reported "
                        "before and after)")
    p.add_argument("--distill", type=_distill_arg, default=c.distill, metavar="T,ALPHA",
                   help="temperature and hard-label weight of the distillation variant (default 4,0.5)")
    p.add_argument("--ptq-method", choices=["minmax", "percentile", "mse"], default=c.ptq_method,
                   help="mobileqat.ptq range method of the ptq_* variants")
    p.add_argument("--no-bias-correction", action="store_true", help="mobileqat.ptq without bias correction")
    p.add_argument("--calibration-images", type=COUNT, default=c.calibration_images)
    p.add_argument("--twin-images", type=COUNT, default=c.twin_images,
                   help="test images on which each file is compared with its integer twin")
    p.add_argument("--bench-runs", type=COUNT, default=c.bench_runs)
    p.add_argument("--threads", type=THREADS, default=c.threads)
    p.add_argument("--seed", type=SEED, default=c.seed)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)

    from mobileqat.ladder import LadderConfig
    c = LadderConfig()
    p = sub.add_parser("auto", help="PTQ first, QAT when needed: climb PTQ -> better calibration -> AdaRound -> "
                                    "mixed plan -> QAT and stop at the first int8 file within --budget points of float")
    p.add_argument("--model-file", required=True, help="your trained float model (.keras or .h5, tf_keras)")
    p.add_argument("--data", help="image folder DATA/<class>/<image> it was trained on (default: the built-in "
                                  "synthetic shapes at the model's input size)")
    p.add_argument("--out", required=True, help="output folder: model.tflite (+ model.h5), report.json, ladder.json "
                                                "and .md, one .tflite per rung; a rerun resumes")
    p.add_argument("--budget", type=number(float, 0.0, 100.0), default=c.budget,
                   help="accuracy points the int8 file may lose against the float file (XNNPACK, test split)")
    p.add_argument("--scheme", default=c.scheme, help="target scheme with int8 activations: w8a8 (default) or a "
                                                      "lower-bit-weight preset such as w4a8")
    p.add_argument("--methods", nargs="+", choices=["minmax", "percentile", "mse"], default=list(c.methods),
                   help="range methods the calibration rung chooses from")
    p.add_argument("--calibration-images", type=COUNT, default=c.calibration_images)
    p.add_argument("--selection-images", type=COUNT, default=c.selection_images,
                   help="training images that choose the calibration method and the mixed plan")
    p.add_argument("--adaround-iters", type=COUNT, default=c.adaround_iters, help="AdaRound steps per layer")
    p.add_argument("--qat-epochs", type=COUNT, default=c.qat_epochs)
    p.add_argument("--qat-learning-rate", type=RATE, default=c.qat_learning_rate)
    p.add_argument("--qat-warmup", type=number(float, 0.0, 0.99), default=c.qat_warmup)
    p.add_argument("--batch-size", type=COUNT, default=c.batch_size)
    p.add_argument("--train", type=COUNT, default=10000, help="built-in shapes: training images")
    p.add_argument("--test", type=COUNT, default=1000, help="built-in shapes: test images")
    p.add_argument("--difficulty", type=number(float, 0.0, 100.0), default=1.3, help="built-in shapes: difficulty")
    _add_pixel_options(p)
    p.add_argument("--twin-images", type=COUNT, default=c.twin_images)
    p.add_argument("--bench-runs", type=COUNT, default=c.bench_runs)
    p.add_argument("--threads", type=THREADS, default=c.threads)
    p.add_argument("--seed", type=SEED, default=c.seed)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_auto)

    from mobileqat.coverage import MODELS, TOOLS
    p = sub.add_parser("coverage", help="which Keras models quantize, convert and lower exactly (mobileqat and tfmot)")
    p.add_argument("--models", nargs="+", choices=MODELS, metavar="MODEL",
                   help="models to cover (default: all): " + ", ".join(MODELS))
    p.add_argument("--out", default="coverage_out", help="folder for one JSON per model and coverage.md")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                   help="quantize with mobileqat, with plain tfmot quantize_model, and/or save and load mobileqat's "
                        "QAT model (.h5, SavedModel)")
    p.add_argument("--again", action="store_true", help="redo models already in --out")
    p.add_argument("--timeout", type=number(int, 1), default=3600, metavar="SECONDS",
                   help="a model's worker is stopped after this long (default %(default)s; NASNet-size models on a "
                        "busy 2-core machine may need more)")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser("sensitivity", help="per-layer sensitivity to a lower precision on the integer twin, and a "
                                           "mixed-precision plan (rules) that meets an accuracy budget")
    p.add_argument("--out", required=True, help="folder for sensitivity.json, plan.json (rules), sensitivity.png, "
                                                "plan_int8.tflite")
    p.add_argument("--budget", type=float, required=True, metavar="POINTS",
                   help="accuracy points (percent) the plan may lose against the all --high baseline, e.g. 0.5")
    p.add_argument("--model-file", help="your trained float model (.keras or .h5, saved with tf_keras)")
    from mobileqat.architectures import MODELS
    p.add_argument("--model", default=None, choices=list(MODELS),
                   help="without --model-file: a built-in architecture trained here (default mobilenet_v2)")
    p.add_argument("--alpha", type=number(float, 1e-3, 10.0), default=None, help="width multiplier (default 0.35)")
    p.add_argument("--epochs", type=COUNT, default=None, help="float training epochs for --model (default 6)")
    p.add_argument("--learning-rate", type=RATE, default=2e-3)
    p.add_argument("--data", help="image folder DATA/<class>/<image> (default: the built-in synthetic shapes)")
    p.add_argument("--input-size", type=SIZE, default=None, help="image side for --model (default 32)")
    p.add_argument("--train", type=COUNT, default=8000, help="synthetic training images")
    p.add_argument("--test", type=COUNT, default=1000, help="synthetic test images")
    _add_pixel_options(p)
    p.add_argument("--high", default="w8a8", help="the scheme of every other layer (default %(default)s)")
    p.add_argument("--low", default="w4a8", help="the lower scheme tried per layer (default %(default)s)")
    from mobileqat.calibration import METHODS
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration range method")
    p.add_argument("--bias-correction", action="store_true")
    p.add_argument("--calibration", type=COUNT, default=256, help="calibration images from the training split")
    p.add_argument("--runtime", choices=["xnnpack", "reference"], default="xnnpack",
                   help="whose arithmetic the integer twin reproduces")
    p.add_argument("--no-export", action="store_true", help="do not write and check plan_int8.tflite")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sensitivity)
    return parser


def main(argv=None):
    """Exit codes: 0 done; 1 a check failed or a runtime could not run; 2 bad input (flags, data,
    files), with one line naming the thing and the fix; 130 interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["device-check"]:  # before the parser: it imports modules that import TensorFlow
        from mobileqat import device_check
        return device_check.main(argv[1:])
    from mobileqat.runtime import RuntimeFailure
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # our errors name the file/thing and the fix
        print(f"mobileqat: error: {e}", file=sys.stderr)
        return 2
    except RuntimeFailure as e:
        print(f"mobileqat: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mobileqat: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
