"""Speed of the integer twin (``mobileqat.lower(qat).run``) against the interpreter, per image, and its
bit-exactness (0 LSB) against the runtime each arithmetic reproduces.

Builds ``mobileqat.architectures.mobilenet_v2((224, 224, 3), 1000, alpha=1.0)`` (``--small``: 96 px, alpha
0.35, 10 classes), quantizes it, fits a few steps on random data so every range is set, exports the int8 file,
lowers it, and times, at each batch size: the twin with reference arithmetic, the twin with XNNPACK
arithmetic, the interpreter on the reference kernels and the interpreter with XNNPACK (``--threads``
threads for the interpreter and for numpy's BLAS, 1 by default). Prints a table of medians over
``--repeats`` runs, taken round robin so that every path sees the same machine load (ms per image, wall
and CPU time), and writes it as JSON.

    python models/bench_twin.py --out bench_twin.json                 # MobileNetV2-224, alpha 1.0
    python models/bench_twin.py --small --out bench_twin_small.json   # MobileNetV2-96, alpha 0.35
    python models/bench_twin.py --cache /tmp/v2_224 ...                # keep/reuse the file and the twin

The model ends in logits (``classifier_activation=None``) unless ``--softmax``: after a few steps on random
data its 1000 logits are nearly flat, and the reference kernels' int8 SOFTMAX then aborts the process
(reference_ops::Softmax, ``TFLITE_CHECK(0 <= exponent && exponent <= 31)``: the sum of exps over ~1000 equal
logits needs more than 8 integer bits). A trained model does not hit it; the softmax costs nothing here.

``--cache DIR`` stores the .tflite and the pickled ``IntegerModel`` in DIR and reuses them when present
(compare two versions of the twin on the same model without training again).
"""
import argparse
import json
import os
import pickle
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="MobileNetV2 96 px, alpha 0.35, 10 classes")
    p.add_argument("--input-size", type=int, help="input height and width (default 224, 96 with --small)")
    p.add_argument("--alpha", type=float, help="width multiplier (default 1.0, 0.35 with --small)")
    p.add_argument("--classes", type=int, help="classes (default 1000, 10 with --small)")
    p.add_argument("--softmax", action="store_true", help="end in a softmax (the default ends in logits)")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell, 5x at batch 1 (median reported)")
    p.add_argument("--steps", type=int, default=3, help="QAT training steps on random data (batch 4)")
    p.add_argument("--threads", type=int, default=1, help="interpreter and BLAS threads (default 1)")
    p.add_argument("--paths", default="twin_reference,twin_xnnpack,interp_reference,interp_xnnpack",
                   help="which of the four paths to time")
    p.add_argument("--cache", help="directory holding model.tflite and twin.pkl (written when absent)")
    p.add_argument("--out", default="bench_twin.json", help="JSON written here")
    args = p.parse_args(argv)
    args.input_size = args.input_size or (96 if args.small else 224)
    args.alpha = args.alpha or (0.35 if args.small else 1.0)
    args.classes = args.classes or (10 if args.small else 1000)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.paths = args.paths.split(",")
    return args


def build(args, folder):
    """Train a few steps, export, lower: (path of the .tflite, IntegerModel)."""
    import numpy as np
    import mobileqat as mq
    from mobileqat._tf import keras
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size = args.input_size
    model = mq.architectures.mobilenet_v2((size, size, 3), args.classes, alpha=args.alpha,
                                          classifier_activation="softmax" if args.softmax else None)
    qat = mq.quantize(model)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=not args.softmax))
    x = rng.uniform(-1, 1, (4 * args.steps, size, size, 3)).astype(np.float32)
    y = rng.integers(0, args.classes, len(x))
    qat.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = os.path.join(folder, "model.tflite")
    mq.export_tflite(qat, path)
    twin = mq.lower(qat)
    with open(os.path.join(folder, "twin.pkl"), "wb") as f:
        pickle.dump(twin, f)
    return path, twin


def main(argv=None):
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy is imported
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    import mobileqat
    from mobileqat.runtime import TFLiteModel

    folder = args.cache or os.path.join(
        "/tmp", f"bench_twin_{args.input_size}_{args.alpha}_{args.classes}_{int(args.softmax)}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.tflite")
    if args.cache and os.path.exists(path) and os.path.exists(os.path.join(folder, "twin.pkl")):
        with open(os.path.join(folder, "twin.pkl"), "rb") as f:
            twin = pickle.load(f)
        print(f"reusing {path} and its twin", flush=True)
    else:
        t = time.perf_counter()
        path, twin = build(args, folder)
        print(f"built, trained {args.steps} steps, exported and lowered in {time.perf_counter() - t:.0f} s",
              flush=True)
    print(f"mobileqat from {os.path.dirname(mobileqat.__file__)}; model {path}", flush=True)

    rng = np.random.default_rng(1)
    size = args.input_size
    images = rng.uniform(-1, 1, (max(args.batches), size, size, 3)).astype(np.float32)
    interpreters = {rt: TFLiteModel(path, rt, threads=args.threads) for rt in ("reference", "xnnpack")
                    if f"interp_{rt}" in args.paths or f"twin_{rt}" in args.paths}
    codes_all = twin.quantize_input(images)
    results = {"model": f"mobilenet_v2 {size}x{size}x3 alpha {args.alpha} classes {args.classes}"
                        + (" softmax" if args.softmax else " logits"),
               "threads": args.threads, "repeats": args.repeats, "numpy": np.__version__,
               "mobileqat": os.path.dirname(mobileqat.__file__), "seconds_per_image": {}, "max_lsb": {}}
    for batch in args.batches:
        codes = codes_all[:batch]
        calls = {}
        for rt, m in interpreters.items():
            if f"interp_{rt}" in args.paths or f"twin_{rt}" in args.paths:
                calls[f"interp_{rt}"] = (lambda m=m: m.invoke_raw(codes))
        for rt in ("reference", "xnnpack"):
            if f"twin_{rt}" in args.paths:
                calls[f"twin_{rt}"] = (lambda rt=rt: twin.run(codes, rt))
        outputs = {name: call() for name, call in calls.items()}  # warm-up: allocation, packing, per-op plans
        times = {name: [] for name in calls}
        cpu = {name: [] for name in calls}
        for _ in range(args.repeats * (5 if batch == 1 else 1)):  # round robin: every path sees the same load
            for name, call in calls.items():
                t, c = time.perf_counter(), time.process_time()
                outputs[name] = call()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        row = {name: statistics.median(ts) / batch for name, ts in times.items() if name in args.paths}
        results["seconds_per_image"][str(batch)] = row
        for key, table, fn in (("min_seconds_per_image", times, min),
                               ("cpu_seconds_per_image", cpu, statistics.median)):
            results.setdefault(key, {})[str(batch)] = {name: fn(ts) / batch for name, ts in table.items()
                                                       if name in args.paths}
        for rt in ("reference", "xnnpack"):
            if f"twin_{rt}" in outputs and f"interp_{rt}" in outputs:
                diff = outputs[f"twin_{rt}"].astype(np.int64) - outputs[f"interp_{rt}"].astype(np.int64)
                results["max_lsb"][f"batch{batch}_{rt}"] = int(np.abs(diff).max())
        print(f"batch {batch}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row.items()), flush=True)
    results["load_average"] = os.getloadavg()

    print(f"\n{results['model']}, {args.threads} thread(s), median of {args.repeats} (round robin); ms per image; "
          f"load average {results['load_average'][0]:.1f}")
    cols = [c for c in ("twin_reference", "twin_xnnpack", "interp_reference", "interp_xnnpack") if c in args.paths]
    print("| batch | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for batch, row in results["seconds_per_image"].items():
        print(f"| {batch} | " + " | ".join(f"{row[c] * 1e3:.2f}" if c in row else "" for c in cols) + " |")
    print("CPU time (process_time), median, ms per image:")
    for batch, row in results["cpu_seconds_per_image"].items():
        print(f"| {batch} | " + " | ".join(f"{row[c] * 1e3:.2f}" if c in row else "" for c in cols) + " |")
    print("max |twin - interpreter| in LSB:", results["max_lsb"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    bad = {k: v for k, v in results["max_lsb"].items() if v}
    if bad:
        print(f"NOT BIT-EXACT: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
