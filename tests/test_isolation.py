"""Runtime workers in any caller: a script without a main guard, a script on standard input,
``python -c`` and a Jupyter kernel. The user's code runs once, and the numbers are right (the
integer twin equals both runtimes at 0 LSB, the file is recognised as the model's own)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mobileqat import runtime as rt

SNIPPET = textwrap.dedent("""\
    import json
    import numpy as np
    import mobileqat as mq
    with open({counter!r}, "a") as f:
        f.write("ran\\n")
    qat = mq.load_qat_model({h5!r})
    mq.export_tflite(qat, {tflite!r})
    x = np.load({x!r})
    result = mq.validate({tflite!r}, x, model=qat)
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def qat_file(tiny_files):
    return tiny_files


def _snippet(folder, tag):
    return SNIPPET.format(counter=str(folder / f"{tag}.count"), h5=str(folder / "a.h5"),
                          tflite=str(folder / f"{tag}.tflite"), x=str(folder / "x.npy"))


def _check(folder, tag, stdout):
    assert (folder / f"{tag}.count").read_text() == "ran\n"  # the user's code ran once, in one process
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["provenance"]["check"] == "fingerprint"
    for name in ("reference", "xnnpack"):
        r = result["runtimes"][name]
        assert r["simulation"] == "integer" and r["max_lsb_diff"] == 0 and r["top1_agreement"] == 1.0, r


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.mark.parametrize("form", ["script_without_main_guard", "stdin", "dash_c"])
def test_validate_runs_the_callers_code_once(qat_file, tmp_path, form):
    code = _snippet(qat_file, form)
    if form == "script_without_main_guard":
        script = tmp_path / "snippet.py"
        script.write_text(code)
        cmd, stdin = [sys.executable, str(script)], None
    elif form == "stdin":
        cmd, stdin = [sys.executable, "-"], code
    else:
        cmd, stdin = [sys.executable, "-c", code], None
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _check(qat_file, form, r.stdout)


def test_validate_runs_the_cells_once_in_a_jupyter_kernel(qat_file):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_snippet(qat_file, "jupyter"))])
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(qat_file)}}).execute(env=_env())
    stdout = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")
    _check(qat_file, "jupyter", stdout)


def test_a_worker_that_aborts_is_reported_not_fatal():
    result, error = rt.run_isolated(os.abort)
    assert result is None and "SIGABRT" in error


def test_a_worker_error_comes_back_as_a_message():
    result, error = rt.run_isolated(rt.describe, "/nonexistent/model.tflite")
    assert result is None and error.startswith("ValueError") and "model.tflite" in error


def test_a_worker_that_hangs_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    result, error = rt.run_isolated(time.sleep, 60, timeout=3)
    assert result is None and "3 s" in error and time.perf_counter() - t0 < 30


def test_run_isolated_refuses_what_a_worker_cannot_import():
    with pytest.raises(ValueError, match="module-level function"):
        rt.run_isolated(lambda: 1)


def test_worker_results_equal_the_in_process_run(qat_file, tmp_path):
    from mobileqat import export
    from mobileqat.quantize import load_qat_model
    qat = load_qat_model(qat_file / "a.h5")
    path = tmp_path / "m.tflite"
    export.export_tflite(qat, path)
    x = np.load(qat_file / "x.npy")
    (raw, quantization, dtype), error = rt.predict_isolated(path, "reference", x)
    m = rt.TFLiteModel(path, "reference")
    assert error is None and dtype == "int8" and quantization == m.output_quantization
    np.testing.assert_array_equal(raw, m.predict(x))
