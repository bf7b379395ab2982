"""`mobileqat run` killed (SIGKILL, no clean-up) during training, an artifact write, validation and
report writing, then rerun: every artifact present is whole, report.json appears only at the end,
finished stages are reused, and the final run is complete and exact."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mobileqat import runtime as rt

ARGS = ["--model", "mobilenet_v1", "--input-size", 32, "--epochs", 2, "--qat-epochs", 1, "--batch-size", 32, "--alpha", 0.25,
        "--bench-runs", 3]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 40 images (32 train + 8 test each): a coloured block on noise."""
    rng = np.random.default_rng(0)
    data = tmp_path_factory.mktemp("images")
    for c, colour in enumerate([(255, 40, 40), (40, 40, 255), (40, 255, 40)]):
        (data / f"class_{c}").mkdir()
        for i in range(40):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            img[8:20, 6:22] = colour
            Image.fromarray(img).save(data / f"class_{c}" / f"{i}.png")
    return data


def _run(images, out, kill_at=None, args=ARGS):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("MOBILEQAT_KILL_AT", None)
    if kill_at:
        env["MOBILEQAT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "mobileqat.cli", "run", "--data", str(images), "--out", str(out),
                           *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=900)


def _nothing_passes_for_finished(out):
    assert not (out / "report.json").exists()
    for path in out.glob("*.tflite"):
        rt.check_tflite(path)  # every .tflite under its final name is whole
    for stage in ("float", "qat"):  # a stage recorded as finished has its model on disk
        if (out / "stages" / f"{stage}.json").exists():
            assert (out / ("float_model.keras" if stage == "float" else "qat_model.h5")).exists()


def test_a_run_killed_at_every_stage_resumes_to_a_complete_exact_report(images, tmp_path):
    out = tmp_path / "run"
    for kill_at in ("train_step:5", "write/ptq_int8.tflite", "validate:2", "report"):
        r = _run(images, out, kill_at)
        assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr[-2000:])
        _nothing_passes_for_finished(out)
        if kill_at.startswith("write"):
            assert list(out.rglob(".tmp-*"))  # a write was cut short, under its temporary name
        if kill_at == "report":
            assert (out / "report.md").exists()  # written first; report.json is the last file
    r = _run(images, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "float training: 96 images, 2 epochs: finished earlier" in r.stdout  # not trained again
    assert "export: float and PTQ int8: written earlier" in r.stdout
    assert not list(out.rglob(".tmp-*"))
    report = json.loads((out / "report.json").read_text())
    fid = report["variants"]["qat_int8"]["fidelity"]
    assert fid["max_lsb_diff"] == 0 and fid["max_lsb_diff_xnnpack"] == 0
    assert fid["provenance"]["check"] == "fingerprint" and report["errors"] == {}


def test_a_changed_command_does_not_resume_from_the_old_checkpoints(images, tmp_path):
    out = tmp_path / "run"
    r = _run(images, out, "train_step:5")  # killed in epoch 2 of 2: epoch 1 is backed up
    assert r.returncode == -signal.SIGKILL and (out / "checkpoints" / "float").exists()
    one_epoch = [1 if a == 2 else a for a in ARGS]  # --epochs 1: another float stage
    r = _run(images, out, "write/float_model.keras", args=one_epoch)
    assert r.returncode == -signal.SIGKILL
    # Resuming the old backup would start at epoch 2 of 1 and train nothing; the new stage trains.
    assert "3/3 [" in r.stdout, r.stdout[-2000:]  # the progress bar of a trained epoch (3 batches)
