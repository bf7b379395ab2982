"""A run folder whose stages survive interruption: a stage's result is kept only once complete.

Each stage (float training, QAT fine-tuning) has a key: a hash of everything that shapes its
output (data, model, schedule, seed). ``stages/<stage>.json`` is written atomically after the
stage's artifacts, so its presence with the same key means the artifacts are whole and reusable.
A stage begun under another key (the command changed) has its checkpoints removed before it
starts again, so training never resumes from a different run's state.
"""
import hashlib
import json
import os
import shutil

import numpy as np

from mobileqat.export import write_atomic

FINAL = ("report.json", "report.md")  # written last: present only when every number was measured


def data_fingerprint(dataset):
    """blake2b of a Dataset's arrays and class names (hex)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(json.dumps([str(c) for c in dataset.class_names]).encode("utf-8", "backslashreplace"))
    return h.hexdigest()


def stage_key(**fields):
    """A stable hash of the fields that shape a stage's output."""
    return hashlib.blake2b(json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class RunFolder:
    """``out_dir`` of one run: clean start, reusable finished stages, resumable checkpoints."""

    def __init__(self, out_dir):
        self.path = os.fspath(out_dir)
        self._stages = os.path.join(self.path, "stages")

    def start(self):
        """Create the folder; remove the previous report and leftover temporary files, so nothing
        from an earlier or interrupted run can pass for this run's result."""
        os.makedirs(self._stages, exist_ok=True)
        for name in FINAL:
            _remove(os.path.join(self.path, name))
        for root, _, names in os.walk(self.path):
            for name in names:
                if name.startswith(".tmp-"):
                    _remove(os.path.join(root, name))

    def finished(self, stage, key, outputs=()):
        """The stored result of ``stage`` if it finished under ``key`` and its ``outputs`` (paths)
        are all on disk, else None."""
        record = _read_json(os.path.join(self._stages, f"{stage}.json"))
        if record and record.get("key") == key and all(os.path.exists(p) for p in outputs):
            return record["result"]
        return None

    def begin(self, stage, key, checkpoint_dir=None):
        """Before (re)doing ``stage``: forget that it finished (its outputs are about to be rewritten),
        and drop its checkpoints when they were made under another key."""
        _remove(os.path.join(self._stages, f"{stage}.json"))
        marker = os.path.join(self._stages, f"{stage}.begun")
        if (_read_json(marker) or {}).get("key") != key:
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            write_atomic(marker, json.dumps({"key": key}).encode())

    def finish(self, stage, key, result):
        """Record ``stage`` as finished (after its artifacts are written)."""
        write_atomic(os.path.join(self._stages, f"{stage}.json"),
                     json.dumps({"key": key, "result": result}).encode())


def _read_json(path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError):
        return None


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
