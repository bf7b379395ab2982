"""Images/s and peak memory of image-folder input pipelines, at two folder sizes.

    python models/bench_input_pipeline.py [--sizes 500 5000] [--image-size 224] [--format jpg]
                                          [--batch-size 64] [--workdir /tmp/mobileqat_bench]

Generates synthetic shapes folders (models/make_shapes_folder.py, 10 classes, IMAGE_SIZE px JPEG or PNG)
of each size, then runs every case in a fresh Python process, one at a time, and reports from inside it:

- ``stream``: ``mobileqat.data.image_folder_stream`` (list + decode-check every file, Pillow in threads),
  then one epoch of ``.dataset("train")`` (shuffled, decoded in parallel by tf.data, scaled, batched);
- ``keras``: ``keras.utils.image_dataset_from_directory(..., validation_split=0.2, subset="training")``
  (tf.io decoders), scaled to [-1, 1] with a map, one epoch;
- ``in_memory``: ``mobileqat.data.load_image_folder`` (every image held as float32), only up to
  --in-memory-max images, since its memory grows with the folder (600 KB per 224x224x3 image).

Per case (median of --repeat fresh processes by epoch images/s; peak memory: the largest of them): the
set-up time (listing; for ``stream`` it includes decoding every file once, to skip the unreadable ones
exactly as load_image_folder does), the epoch's images/s (training split, 80 %), and the peak resident
memory of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, TensorFlow included).
The table is printed as markdown; the raw numbers go to WORKDIR/bench.json.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KB


def run_case(case, folder, image_size, batch_size):
    """One case in this (fresh) process; returns its numbers."""
    sys.path.insert(0, ROOT)
    import mobileqat  # noqa: F401 - selects Keras 2 before TensorFlow is imported
    from mobileqat._tf import keras, tf
    rss_import = _rss_mb()
    t0 = time.perf_counter()
    if case == "stream":
        from mobileqat.data import image_folder_stream
        stream = image_folder_stream(folder, image_size=image_size, seed=0)
        ds = stream.dataset("train", batch_size=batch_size, shuffle=True, seed=0)
        n = len(stream.train_files)
    elif case == "keras":
        ds = keras.utils.image_dataset_from_directory(folder, image_size=(image_size, image_size),
                                                      batch_size=batch_size, shuffle=True, seed=0,
                                                      validation_split=0.2, subset="training")
        ds = ds.map(lambda x, y: (x / 127.5 - 1.0, y), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        n = None
    elif case == "in_memory":
        from mobileqat.data import load_image_folder
        ds = load_image_folder(folder, image_size=image_size, seed=0)
        n = len(ds.x_train)
    else:
        raise ValueError(case)
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if case == "in_memory":  # already decoded: an epoch is the batching of arrays
        from mobileqat.data import as_tf_dataset
        seen = sum(int(x.shape[0]) for x, _ in as_tf_dataset(ds.x_train, ds.y_train, batch_size, shuffle=True))
    else:
        seen = 0
        for x, _ in ds:
            seen += int(x.shape[0])
    epoch_s = time.perf_counter() - t1
    assert n is None or seen == n, (seen, n)
    return {"case": case, "images_train": seen, "setup_s": setup_s, "epoch_s": epoch_s,
            "epoch_images_per_s": seen / epoch_s, "total_images_per_s": seen / (setup_s + epoch_s),
            "rss_after_import_mb": rss_import, "peak_rss_mb": _rss_mb()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000], help="images per folder")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=["stream", "keras", "in_memory"])
    parser.add_argument("--in-memory-max", type=int, default=500, help="largest folder for the in_memory case")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median images/s, max RSS)")
    parser.add_argument("--workdir", default="/tmp/mobileqat_bench")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.folder, args.image_size, args.batch_size)))
        return 0

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    rows = []
    for n in args.sizes:
        folder = os.path.join(args.workdir, f"shapes_{n}_{args.image_size}_{args.format}")
        if not os.path.isdir(folder):
            subprocess.run([sys.executable, os.path.join(HERE, "make_shapes_folder.py"), folder, "--n", str(n),
                            "--size", str(args.image_size), "--format", args.format], check=True, env=env)
        for case in args.cases:
            if case == "in_memory" and n > args.in_memory_max:
                continue
            runs = []
            for _ in range(max(1, args.repeat)):  # one fresh process per run
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case, "--folder", folder,
                                    "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)],
                                   capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    sys.exit(f"case {case} on {folder} failed:\n{r.stderr[-3000:]}")
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            med = sorted(runs, key=lambda x: x["epoch_images_per_s"])[len(runs) // 2]
            row = {"folder_images": n, **med, "peak_rss_mb": max(x["peak_rss_mb"] for x in runs),
                   "epoch_images_per_s_all": [round(x["epoch_images_per_s"]) for x in runs]}
            rows.append(row)
            print(f"{case:>9} {n:>6} images: set-up {row['setup_s']:.1f} s, epoch {row['epoch_images_per_s']:.0f} "
                  f"images/s (runs: {row['epoch_images_per_s_all']}), peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "bench.json"), "w") as f:
        json.dump({"args": vars(args), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}, f,
                  indent=2)
    print(f"\n{args.image_size}x{args.image_size} {args.format.upper()}, batch {args.batch_size}, median of "
          f"{args.repeat} runs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| pipeline | folder | set-up (s) | epoch images/s | set-up + epoch images/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['folder_images']:,} | {r['setup_s']:.1f} | {r['epoch_images_per_s']:.0f} | "
              f"{r['total_images_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
