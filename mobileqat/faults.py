"""Crash points for the interruption tests. A no-op unless ``MOBILEQAT_KILL_AT=target[:n]`` is set:
then the n-th time (default 1) a matching ``point`` is reached, the process is killed with SIGKILL,
as a power cut or an out-of-memory kill would, with no clean-up of any kind. ``target`` is a point's
name, or name/detail (e.g. ``write/qat_int8.tflite``).

Points: "train_step" (after each training batch), "write" (an artifact's bytes are on disk under
their temporary name, not yet renamed; detail: the file name), "validate" (after each runtime of a
validation), "report" (between report.md and report.json).
"""
import os
import signal

_seen = {}


def point(name, detail=""):
    spec = os.environ.get("MOBILEQAT_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target not in (name, f"{name}/{detail}"):
        return
    _seen[target] = _seen.get(target, 0) + 1
    if _seen[target] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
