"""Start-up cost of a runtime worker: python -m mobileqat._worker (this design) vs multiprocessing
spawn (the previous design), for a trivial job and for loading a .tflite; median of N calls.

    python models/worker_cost.py OUT/qat_int8.tflite [N]
"""
import concurrent.futures, multiprocessing, statistics, sys, time
import numpy as np
from mobileqat import runtime as rt

PATH = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 10


def spawn(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def timed(call):
    times = []
    for _ in range(N):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3


if __name__ == "__main__":
    x = np.zeros((1, 32, 32, 3), np.float32)
    rows = {
        "worker, trivial job (np.add)": lambda: rt.run_isolated(np.add, 1, 2),
        "spawn, trivial job (np.add)": lambda: spawn(np.add, 1, 2),
        "worker, load + predict 1 image (xnnpack)": lambda: rt.predict_isolated(PATH, "xnnpack", x),
        "spawn, load + predict 1 image (xnnpack)": lambda: spawn(rt._predict_job, PATH, "xnnpack", 1, x, 64),
        "in process, load + predict 1 image (xnnpack)": lambda: rt._predict_job(PATH, "xnnpack", 1, x, 64),
    }
    for name, call in rows.items():
        med, lo, hi = timed(call)
        print(f"{name:48} median {med:7.1f} ms  (min {lo:.1f}, max {hi:.1f}, {N} calls)")
