"""Run a .tflite file on one LiteRT runtime. Needs numpy and ai-edge-litert, not TensorFlow.

Runtimes (ai_edge_litert.interpreter.OpResolverType):
  "reference": BUILTIN_REF, the reference kernels (the arithmetic the spec defines);
  "builtin":   BUILTIN_WITHOUT_DEFAULT_DELEGATES, optimized builtin kernels;
  "xnnpack":   AUTO, the default, with the XNNPACK delegate.

A runtime can abort the whole process (SIGABRT in a kernel's Prepare) and a corrupt file can crash
the parser; ``run_isolated`` runs a function in a worker process (``python -m mobileqat._worker``)
and turns such a death into an error message.
"""
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

RUNTIMES = ("reference", "builtin", "xnnpack")


def quantize(values, scale, zero_point, dtype):
    """Float values -> integer codes of a tensor (scale, zero point, integer dtype), as int64:
    round half away from zero (std::round, as TFLite's QUANTIZE), then clamp to the dtype."""
    info = np.iinfo(np.dtype(dtype))
    v = np.asarray(values, np.float64) / scale
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + zero_point
    return np.clip(q, info.min, info.max).astype(np.int64)


def _resolver(runtime):
    from ai_edge_litert.interpreter import OpResolverType
    table = {"reference": OpResolverType.BUILTIN_REF,
             "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
             "xnnpack": OpResolverType.AUTO}
    if runtime not in table:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {list(table)}.")
    return table[runtime]


class TFLiteModel:
    """One .tflite model with one input and one output on one runtime.

    ``predict(x)`` takes float images (N, H, W, C) as the Keras model does, quantizes them with the
    input tensor's scale/zero point when the input is integer, and returns the raw output
    (N, classes) in the output tensor's dtype (int8/uint8 codes or float32).
    """

    def __init__(self, path, runtime="xnnpack", threads=1, preserve_all_tensors=False):
        from ai_edge_litert.interpreter import Interpreter
        self.path, self.runtime, self.threads = os.fspath(path), runtime, threads
        self.interpreter = Interpreter(model_path=self.path, num_threads=threads,
                                       experimental_op_resolver_type=_resolver(runtime),
                                       experimental_preserve_all_tensors=preserve_all_tensors)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{self.path}: mobileqat runs models with one input and one output, "
                             f"this one has {len(inputs)} and {len(outputs)}.")
        self.input, self.output = inputs[0], outputs[0]
        self._batch = None

    @property
    def input_quantization(self):
        """(scale, zero_point) of the input tensor; (0.0, 0) when it is float."""
        return tuple(self.input["quantization"])

    @property
    def output_quantization(self):
        """(scale, zero_point) of the output tensor; (0.0, 0) when it is float."""
        return tuple(self.output["quantization"])

    def quantize_input(self, x):
        """Float images -> the input tensor's dtype (round half away from zero, clamp)."""
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return np.asarray(x, np.float32)
        scale, zero = self.input_quantization
        return quantize(x, scale, zero, dtype).astype(dtype)

    def _resize(self, n):
        if self._batch != n:
            shape = list(self.input["shape"])
            shape[0] = n
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = n

    def invoke_raw(self, xq):
        """Run one batch already in the input dtype; returns the output tensor (a copy)."""
        self._resize(len(xq))
        self.interpreter.set_tensor(self.input["index"], xq)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()

    def predict(self, x, batch_size=64):
        """Float images (N, H, W, C) -> raw outputs (N, ...) in the output dtype."""
        xq = self.quantize_input(x)
        outs = [self.invoke_raw(xq[i:i + batch_size]) for i in range(0, len(xq), batch_size)]
        return np.concatenate(outs, axis=0)

    def dequantize(self, raw):
        scale, zero = self.output_quantization
        if self.output["dtype"] == np.float32:
            return np.asarray(raw, np.float32)
        return (raw.astype(np.float32) - zero) * scale

    def prepare_latency(self, warmup=10):
        """Batch 1, a fixed random input, ``warmup`` invokes: ready for ``timed_invoke``."""
        rng = np.random.default_rng(0)
        shape = [1] + list(self.input["shape"][1:])
        x = self.quantize_input(rng.uniform(-1, 1, shape))
        self._resize(1)
        self.interpreter.set_tensor(self.input["index"], x)
        for _ in range(warmup):
            self.interpreter.invoke()

    def timed_invoke(self):
        """One invoke's wall time in ms."""
        t0 = time.perf_counter()
        self.interpreter.invoke()
        return (time.perf_counter() - t0) * 1e3

    def latency_ms(self, warmup=10, runs=50):
        """Per-invoke wall times (ms) at batch 1 on a fixed random input, after ``warmup`` invokes."""
        self.prepare_latency(warmup)
        return [self.timed_invoke() for _ in range(runs)]


def _predict_job(path, runtime, threads, x, batch_size):
    m = TFLiteModel(path, runtime, threads)
    return m.predict(x, batch_size), m.output_quantization, str(np.dtype(m.output["dtype"]))


def _latency_job(path, runtime, threads, warmup, runs):
    return TFLiteModel(path, runtime, threads).latency_ms(warmup, runs)


def _paired_latency_job(path_a, path_b, runtime, threads, warmup, runs):
    """Per-invoke latencies (ms) of two files in one process, invoked in turn (A B, then B A, ...) so that
    both see the same machine load: (times_a, times_b)."""
    a, b = TFLiteModel(path_a, runtime, threads), TFLiteModel(path_b, runtime, threads)
    a.prepare_latency(warmup)
    b.prepare_latency(warmup)
    ta, tb = [], []
    for i in range(runs):
        if i % 2:
            tb.append(b.timed_invoke())
            ta.append(a.timed_invoke())
        else:
            ta.append(a.timed_invoke())
            tb.append(b.timed_invoke())
    return ta, tb


def describe(path):
    """{"input_dtype", "input_quantization", "input_shape", "output_dtype", "output_quantization",
    "output_shape", "ops": [op names]} of a .tflite, read in this process (see ``check_tflite``).
    No tensor is allocated, so no kernel's Prepare runs: a runtime that cannot prepare the file is
    reported by that runtime's own run, not here."""
    m = TFLiteModel(path, "reference")
    return {"input_dtype": np.dtype(m.input["dtype"]).name, "input_quantization": m.input_quantization,
            "input_shape": [int(d) for d in m.input["shape"]],
            "output_dtype": np.dtype(m.output["dtype"]).name, "output_quantization": m.output_quantization,
            "output_shape": [int(d) for d in m.output["shape"]],
            "ops": [op["op_name"] for op in m.interpreter._get_ops_details()]}


def xnnpack_coverage(path):
    """{"delegated": ops XNNPACK runs, "total": ops of the file, "left": {op name: count} of the ops left
    to the builtin kernels}. Run it in a worker (``run_isolated``): it allocates tensors.

    The interpreter keeps the replaced nodes after a DELEGATE node; a node is delegated when a DELEGATE
    node produces one of its outputs, or when it feeds a delegated node through a tensor that is not an
    input of a DELEGATE node (a tensor inside a partition)."""
    from collections import Counter
    m = TFLiteModel(path, "xnnpack")
    m.interpreter.allocate_tensors()
    ops = m.interpreter._get_ops_details()
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    plain = [op for op in ops if op["op_name"] != "DELEGATE"]
    boundary = {int(i) for op in delegates for i in op["inputs"]}
    producer = {int(o): k for k, op in enumerate(plain) for o in op["outputs"]}
    delegated = set()
    todo = [producer[int(o)] for op in delegates for o in op["outputs"] if int(o) in producer]
    while todo:
        k = todo.pop()
        if k in delegated:
            continue
        delegated.add(k)
        todo += [producer[int(i)] for i in plain[k]["inputs"] if int(i) in producer and int(i) not in boundary]
    left = Counter(op["op_name"] for k, op in enumerate(plain) if k not in delegated)
    return {"delegated": len(delegated), "total": len(plain), "left": dict(left)}


class InvalidModelError(ValueError):
    """A .tflite that cannot be read, names the file and the fix."""


class RuntimeFailure(RuntimeError):
    """A runtime could not run a file that loads (its kernels refused or aborted); names both."""


def check_tflite(path, timeout=120):
    """Load ``path`` in a worker process (a corrupt flatbuffer can crash the process that parses it)
    and return ``describe(path)``. Raises FileNotFoundError, or InvalidModelError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such .tflite file; pass the path of an exported model "
                                "(e.g. OUT/qat_int8.tflite).")
    desc, error = run_isolated(describe, path, timeout=timeout)
    if error:
        raise InvalidModelError(f"{path} is not a .tflite model mobileqat can run ({error}); re-export it "
                                "(mobileqat.export_tflite or `mobileqat run`) or check that the copy is complete.")
    return desc


def _worker_command():
    """The interpreter command of a worker: this Python (MOBILEQAT_PYTHON overrides), -P so the
    caller's working directory never shadows a module."""
    python = os.environ.get("MOBILEQAT_PYTHON") or sys.executable
    return [python, "-P", "-m", "mobileqat._worker"]


def _worker_env():
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_isolated(fn, *args, timeout=None):
    """Run ``fn(*args)`` in a fresh worker process; return (result, None) or (None, error message).

    ``fn`` must be a module-level function of an importable module; arguments and result are
    pickled through files in a private temporary folder. The worker is ``python -m
    mobileqat._worker``: it never re-imports the caller's main module, so this works from scripts
    without a main guard, from standard input, ``python -c`` and notebooks. A kernel that aborts the
    process (SIGABRT, SIGSEGV) or a timeout becomes an error message, not a crash.
    """
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<" in qualname:
        raise ValueError(f"run_isolated needs a module-level function of an importable module, not {fn!r}; "
                         "move it into a module.")
    with tempfile.TemporaryDirectory(prefix="mobileqat-worker-") as folder:
        request, result = os.path.join(folder, "request.pkl"), os.path.join(folder, "result.pkl")
        with open(request, "wb") as f:
            pickle.dump({"function": f"{module}:{qualname}", "args": list(args)}, f, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            done = subprocess.run(_worker_command() + [request, result], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_worker_env(),
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"the runtime did not finish within {timeout} s (worker killed)"
        if done.returncode < 0:
            try:
                name = signal.Signals(-done.returncode).name
            except ValueError:
                name = f"signal {-done.returncode}"
            return None, f"the runtime killed the process with {name} (a kernel aborted, e.g. in Prepare)"
        if not os.path.exists(result):
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            return None, f"the runtime worker exited with code {done.returncode} ({tail[0]})"
        with open(result, "rb") as f:
            answer = pickle.load(f)
    if "error" in answer:
        return None, answer["error"]
    return answer["result"], None


def predict_isolated(path, runtime, x, threads=1, batch_size=64):
    """``TFLiteModel(path, runtime).predict(x)`` in a worker process.

    Returns ((raw outputs, (scale, zero_point), dtype name), None) or (None, error message)."""
    return run_isolated(_predict_job, os.fspath(path), runtime, threads, np.asarray(x, np.float32), batch_size)


def latency_isolated(path, runtime, threads=1, warmup=10, runs=50):
    """Per-invoke latencies (ms) in a worker process: (list, None) or (None, error message)."""
    return run_isolated(_latency_job, os.fspath(path), runtime, threads, warmup, runs)


def paired_latency_isolated(path_a, path_b, runtime, threads=1, warmup=10, runs=50):
    """Two files' per-invoke latencies (ms), interleaved in one worker: ((a, b), None) or (None, error)."""
    return run_isolated(_paired_latency_job, os.fspath(path_a), os.fspath(path_b), runtime, threads, warmup, runs)
