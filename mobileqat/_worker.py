"""The runtime worker: ``python -m mobileqat._worker REQUEST RESULT``.

A fresh interpreter that never imports the caller's main module (unlike multiprocessing's spawn),
so it behaves the same under a script without a main guard, a script read from standard input,
``python -c`` and Jupyter. REQUEST is a pickle of {"function": "module:qualname", "args": [...]}
written by ``mobileqat.runtime.run_isolated``; the worker writes {"result": ...} or {"error": "Type:
message"} to RESULT. A kernel that kills the process leaves no RESULT; the parent reports the signal.
"""
import importlib
import pickle
import sys


def _call(request):
    module, _, qualname = request["function"].partition(":")
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn(*request["args"])


def main(argv):
    request_path, result_path = argv
    with open(request_path, "rb") as f:
        request = pickle.load(f)
    try:
        answer = {"result": _call(request)}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names the runtime and file
        text = str(e).strip()
        answer = {"error": f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"}
    with open(result_path + ".part", "wb") as f:
        pickle.dump(answer, f, protocol=pickle.HIGHEST_PROTOCOL)
    import os
    os.replace(result_path + ".part", result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
