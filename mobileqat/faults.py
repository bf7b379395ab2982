"""Crash points for the interruption tests. A no-op unless ``MOBILEQAT_KILL_AT=name[:n]`` is set:
then the n-th time (default 1) ``point(name)`` is reached, the process is killed with SIGKILL, as a
power cut or an out-of-memory kill would, with no clean-up of any kind.

Points: "train_step" (after each training batch), "write" (an artifact's bytes are on disk under
their temporary name, not yet renamed), "validate" (after each runtime of a validation), "report"
(between report.md and report.json).
"""
import os
import signal

_seen = {}


def point(name):
    spec = os.environ.get("MOBILEQAT_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
