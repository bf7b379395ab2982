"""The deployment package (mobileqat.package) and the device check (mobileqat.device_check) on a real tiny
package: inputs against PIL + numpy, outputs against the interpreter, the twin per op, TensorFlow absent,
and every way a copied package can be broken."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mobileqat import device_check as dc

GOLDEN = 24
BLOCK_TF = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'tensorflow_model_optimization', 'keras'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, _NoTensorFlow())
"""


def _python(code, timeout=600, **env):
    full = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(package folder, image folder, QAT model .h5, manifest) of ``package.demo_package``."""
    from mobileqat.package import demo_package
    root = tmp_path_factory.mktemp("pkg")
    manifest = demo_package(root / "pkg", golden=GOLDEN, data_dir=root / "images", model_path=root / "qat.h5",
                            log=lambda m: None)
    return root / "pkg", root / "images", root / "qat.h5", manifest


def _copy(demo, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(demo[0], dst)
    return dst


def _resign(pkg, rel):
    """Update manifest.json's size and sha256 of ``rel`` after a deliberate change (a 'valid' wrong package)."""
    m = json.loads((pkg / "manifest.json").read_text())
    data = (pkg / rel).read_bytes()
    m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (pkg / "manifest.json").write_text(json.dumps(m))


def _check(pkg, *flags):
    return _python(BLOCK_TF + f"from mobileqat.cli import main\nsys.exit(main(['device-check', {str(pkg)!r}, "
                   f"'--runs', '3', {', '.join(repr(f) for f in flags)}]))")


def test_manifest_describes_the_file(demo):
    from ai_edge_litert.interpreter import Interpreter
    pkg, images, _, m = demo
    assert m == json.loads((pkg / "manifest.json").read_text())
    model = (pkg / "model.tflite").read_bytes()
    assert m["model"]["sha256"] == hashlib.sha256(model).hexdigest() and m["model"]["bytes"] == len(model)
    it = Interpreter(model_content=model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert m["input"]["shape"] == [1, 16, 16, 3] and m["input"]["dtype"] == "int8"
    assert (m["input"]["scale"], m["input"]["zero_point"]) == tuple(inp["quantization"])
    assert (m["output"]["scale"], m["output"]["zero_point"]) == tuple(out["quantization"]) == (1 / 256, -128)
    assert "softmax" in m["output"]["meaning"]
    assert (pkg / "labels.txt").read_text().splitlines() == sorted(p.name for p in images.iterdir())
    p = m["preprocessing"]
    assert (p["color"], p["pixels"], p["resize"]["method"], p["resize"]["height"]) == ("RGB", "-1..1", "bilinear", 16)
    folded = [r for r in m["schemes"] if r["class"] == "FoldedConvBN"]
    assert len(folded) == 5 and all(r["weights"]["per_channel"] and r["weights"]["num_bits"] == 8 for r in folded)
    assert m["versions"]["tensorflow"] and m["versions"]["ai-edge-litert"]
    for rel, entry in m["files"].items():
        assert hashlib.sha256((pkg / rel).read_bytes()).hexdigest() == entry["sha256"]
    assert not [p for p in pkg.parent.iterdir() if p.name.startswith(".tmp-")]


def test_golden_inputs_are_pil_plus_numpy_of_the_source_images(demo):
    """The stored input tensors == the test images (32 px PNGs) resized by PIL and quantized in numpy."""
    from mobileqat.data import image_folder_stream
    pkg, images, _, m = demo
    x = dc.read_tensor(pkg / "golden" / "input.bin")
    stream = image_folder_stream(images, image_size=16, seed=0, test_fraction=GOLDEN / (600 + GOLDEN))
    n = m["golden"]["count"]
    assert len(stream.test_files) == n == len(x) and n >= 16
    scale, zero = m["input"]["scale"], m["input"]["zero_point"]
    for i, path in enumerate(stream.test_files):
        src = Image.open(path).convert("RGB")
        assert src.size == (32, 32)  # the resize is exercised
        u = np.asarray(src.resize((16, 16), Image.BILINEAR), np.float32)
        v = (u / np.float32(127.5) - np.float32(1)).astype(np.float64) / scale
        q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5) + zero, -128, 127)
        np.testing.assert_array_equal(x[i], q.astype(np.int8))
        assert Image.open(pkg / m["golden"]["images"][i]).size == (32, 32)
    np.testing.assert_array_equal(dc.read_tensor(pkg / "golden" / "labels.bin"), stream.y_test[:n])


def test_golden_outputs_are_the_interpreters_and_the_twins(demo):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    pkg, _, _, m = demo
    x = dc.read_tensor(pkg / "golden" / "input.bin")
    outs = {}
    for name, kind in (("reference", OpResolverType.BUILTIN_REF), ("xnnpack", OpResolverType.AUTO)):
        it = Interpreter(model_path=str(pkg / "model.tflite"), experimental_op_resolver_type=kind)
        it.resize_tensor_input(it.get_input_details()[0]["index"], list(x.shape))
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        outs[name] = it.get_tensor(it.get_output_details()[0]["index"])
        np.testing.assert_array_equal(dc.read_tensor(pkg / "golden" / f"{name}.bin"), outs[name])
    assert not np.array_equal(outs["reference"], outs["xnnpack"])  # the two runtimes are told apart
    for name in ("reference", "xnnpack"):
        twin = m["validation"]["integer_twin"][name]
        assert twin["identical"] == m["golden"]["count"] and twin["max_lsb_diff"] == 0
        assert twin["per_op"]["ops_compared"] == twin["per_op"]["of"] == len(m["trace"]["ops"]) == 8
        assert twin["per_op"]["images"] == m["trace"]["images"] == m["golden"]["count"]
        assert twin["per_op"]["max_lsb_diff"] == 0


def test_trace_equals_the_reference_interpreters_preserved_tensors(demo):
    """with_output (graph output patched to an intermediate) gives what the interpreter keeps internally."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    pkg, _, _, m = demo
    x = dc.read_tensor(pkg / "golden" / "input.bin")
    it = Interpreter(model_path=str(pkg / "model.tflite"), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    for i in range(m["trace"]["images"]):
        it.set_tensor(it.get_input_details()[0]["index"], x[i:i + 1])
        it.invoke()
        for op in m["trace"]["ops"]:
            np.testing.assert_array_equal(dc.read_tensor(pkg / op["reference"])[i], it.get_tensor(op["tensor"])[0])


def test_device_check_passes_without_tensorflow(demo):
    r = _check(demo[0], "--trace")
    assert r.returncode == 0, r.stderr[-2000:]
    n = demo[3]["golden"]["count"]
    assert f"preprocessing: {n}/{n} PNGs" in r.stdout and "device-check: PASS" in r.stdout
    assert f"xnnpack per op: all 8 op outputs x {n} images identical" in r.stdout and "latency median" in r.stdout
    r = _python(BLOCK_TF + "import mobileqat.device_check, mobileqat.cli\n"
                "print(sorted(m for m in sys.modules if m.startswith(('mobileqat', 'tensorflow'))))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['mobileqat', 'mobileqat.cli', 'mobileqat.device_check']"


def test_device_check_standalone_file(demo, tmp_path):
    """device_check.py copied alone runs as a script (what a board without mobileqat installed does)."""
    shutil.copy(dc.__file__, tmp_path / "device_check.py")
    r = subprocess.run([sys.executable, "-P", str(tmp_path / "device_check.py"), str(demo[0]), "--runs", "2",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["passed"] and result["runtimes"]["xnnpack"]["identical"] == demo[3]["golden"]["count"]
    assert result["runtimes"]["reference"]["latency_ms"]["p90"] >= result["runtimes"]["reference"]["latency_ms"]["median"]


def test_corrupt_model_is_a_sha256_error(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    data = bytearray((pkg / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0x40
    (pkg / "model.tflite").write_bytes(bytes(data))
    r = _check(pkg)
    assert r.returncode == 2 and "model.tflite: sha256" in r.stderr and "corrupt" in r.stderr


def test_truncated_golden_file(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    path = pkg / "golden" / "xnnpack.bin"
    path.write_bytes(path.read_bytes()[:-7])
    r = _check(pkg)
    assert r.returncode == 2 and "xnnpack.bin" in r.stderr and "truncated" in r.stderr
    _resign(pkg, "golden/xnnpack.bin")  # sizes agree with the manifest: the tensor header still tells
    r = _check(pkg)
    assert r.returncode == 2 and "truncated" in r.stderr and "needs" in r.stderr


def test_wrong_sha256_in_manifest(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    m = json.loads((pkg / "manifest.json").read_text())
    m["files"]["labels.txt"]["sha256"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(m))
    r = _check(pkg)
    assert r.returncode == 2 and "labels.txt: sha256" in r.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated", "no_preprocessing"])
def test_broken_manifest(demo, tmp_path, damage):
    pkg = _copy(demo, tmp_path)
    if damage == "missing":
        (pkg / "manifest.json").unlink()
    elif damage == "truncated":
        (pkg / "manifest.json").write_bytes((pkg / "manifest.json").read_bytes()[:500])
    else:
        m = json.loads((pkg / "manifest.json").read_text())
        del m["preprocessing"]
        (pkg / "manifest.json").write_text(json.dumps(m))
    r = _check(pkg)
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_changed_output_code_is_a_mismatch_naming_the_image(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    codes = dc.read_tensor(pkg / "golden" / "xnnpack.bin").copy()
    was = int(codes[5, 3])
    codes[5, 3] = was + 1 if was < 127 else was - 1
    dc.write_tensor(pkg / "golden" / "xnnpack.bin", codes)
    _resign(pkg, "golden/xnnpack.bin")
    r = _check(pkg)
    assert r.returncode == 1, r.stdout + r.stderr
    n = demo[3]["golden"]["count"]
    assert f"xnnpack: {n - 1}/{n} images" in r.stdout and "first difference on xnnpack: image golden/images/0005.png, " \
        f"output 3: {was} here, {codes[5, 3]} stored" in r.stdout


def test_first_op_that_differs_is_named(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    op = demo[3]["trace"]["ops"][2]
    values = dc.read_tensor(pkg / op["xnnpack"]).copy()
    k = int(np.flatnonzero(values[1].ravel() < 100)[0])
    values[1].flat[k] += 3
    dc.write_tensor(pkg / op["xnnpack"], values)
    _resign(pkg, op["xnnpack"])
    r = _check(pkg, "--trace")
    assert r.returncode == 1
    assert f"xnnpack per op: FIRST OP THAT DIFFERS: op {op['index']} {op['op']}" in r.stdout
    assert "image golden/images/0001.png, max 3 LSB" in r.stdout
    assert "reference per op: all 8" in r.stdout


def test_preprocessing_mismatch_names_the_png(demo, tmp_path):
    pkg = _copy(demo, tmp_path)
    rel = "golden/images/0003.png"
    img = np.asarray(Image.open(pkg / rel), np.int16)
    Image.fromarray(np.clip(img + 9, 0, 255).astype(np.uint8)).save(pkg / rel)
    _resign(pkg, rel)
    r = _check(pkg)
    n = demo[3]["golden"]["count"]
    assert r.returncode == 1 and f"{n - 1}/{n} PNGs" in r.stdout and f"MISMATCH from {rel}" in r.stdout


def test_tensor_format(tmp_path):
    a = np.arange(-6, 6, dtype=np.int8).reshape(2, 3, 2)
    dc.write_tensor(tmp_path / "a.bin", a)
    raw = (tmp_path / "a.bin").read_bytes()
    assert raw[:4] == b"MQGT" and np.frombuffer(raw[4:28], "<u4").tolist() == [1, 1, 3, 2, 3, 2]
    assert raw[28:] == a.tobytes() and len(raw) == 16 + 4 * 3 + 12
    np.testing.assert_array_equal(dc.read_tensor(tmp_path / "a.bin"), a)
    f = np.array([[1.5, -2.0]], np.float32)
    dc.write_tensor(tmp_path / "f.bin", f)
    np.testing.assert_array_equal(dc.read_tensor(tmp_path / "f.bin"), f)
    for bad, why in ((raw + b"\0", "trailing bytes"), (raw[:20], "truncated in its header"),
                     (b"XXXX" + raw[4:], "not a golden tensor file")):
        (tmp_path / "b.bin").write_bytes(bad)
        with pytest.raises(dc.PackageError, match=why):
            dc.read_tensor(tmp_path / "b.bin")


def test_export_command_and_atomic_write(demo, tmp_path):
    """`mobileqat export` writes a package that passes; a write killed before the rename leaves no package;
    a folder that is not a package is never replaced."""
    pkg, images, model, _ = demo
    write = (f"from mobileqat.package import write_package\nfrom mobileqat.quantize import load_qat_model\n"
             f"from mobileqat.data import image_folder_stream\n"
             f"s = image_folder_stream({str(images)!r}, image_size=16, seed=0, test_fraction={GOLDEN / (600 + GOLDEN)})\n"
             f"write_package(load_qat_model({str(model)!r}), {str(pkg / 'model.tflite')!r}, "
             f"{str(tmp_path / 'killed')!r}, s, golden=4)\n")
    r = _python(write, MOBILEQAT_KILL_AT="write/killed")
    assert r.returncode == -9 and not (tmp_path / "killed").exists()
    r = _python(write)
    assert r.returncode == 0, r.stderr[-2000:]
    assert dc.check(tmp_path / "killed", runs=0, log=lambda s: None)["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]  # the killed write's temporary folder is gone

    (tmp_path / "notapkg").mkdir()
    (tmp_path / "notapkg" / "keep.txt").write_text("mine")
    cli = [sys.executable, "-m", "mobileqat.cli", "export", str(model), "--data", str(images), "--golden", "6"]
    r = subprocess.run(cli + ["--out", str(tmp_path / "notapkg")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "is not a mobileqat package" in r.stderr
    assert (tmp_path / "notapkg" / "keep.txt").read_text() == "mine"
    r = subprocess.run(cli + ["--out", str(tmp_path / "killed")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "integer twin vs runtimes: reference max 0 LSB, xnnpack max 0 LSB" in r.stdout
    m = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert m["golden"]["count"] == 6 and dc.check(tmp_path / "killed", runs=0, log=lambda s: None)["passed"]


def test_aarch64_codes_differ_only_after_softmax(demo):
    """The package's aarch64 XNNPACK codes: the twin with the aarch64 SOFTMAX; every op before SOFTMAX is the x86
    trace; on this machine, `--machine aarch64` holds XNNPACK to them (fails exactly when they differ)."""
    from mobileqat import integer
    pkg, _, _, m = demo
    arm = m["golden"]["machines"]["aarch64"]
    assert arm["xnnpack"] == "golden/xnnpack.aarch64.bin"
    x86 = dc.read_tensor(pkg / "golden" / "xnnpack.bin").astype(np.int64)
    a64 = dc.read_tensor(pkg / arm["xnnpack"]).astype(np.int64)
    assert np.abs(x86 - a64).max() <= 1
    assert arm["images_differing_from_x86"] == int(np.any(x86 != a64, axis=1).sum())
    softmax_in = m["trace"]["ops"][-2]
    assert m["trace"]["ops"][-1]["op"] == "SOFTMAX" and "xnnpack.aarch64" in m["trace"]["ops"][-1]
    assert all("xnnpack.aarch64" not in op for op in m["trace"]["ops"][:-1])
    from ai_edge_litert.interpreter import Interpreter
    scale = {t["index"]: t for t in Interpreter(model_path=str(pkg / "model.tflite")).get_tensor_details()}[
        softmax_in["tensor"]]["quantization"][0]
    logits = dc.read_tensor(pkg / softmax_in["xnnpack"])
    np.testing.assert_array_equal(integer.softmax_lut_uint16(logits, scale, 0), a64)
    np.testing.assert_array_equal(integer.softmax_lut(logits, scale, 0), x86)  # x86: the float table
    r = _check(pkg, "--machine", "aarch64")
    assert "held to golden/xnnpack.aarch64.bin" in r.stdout
    if arm["images_differing_from_x86"]:
        assert r.returncode == 1 and "xnnpack per op: FIRST OP THAT DIFFERS" in r.stdout and "SOFTMAX" in r.stdout
    else:
        assert r.returncode == 0


def test_uint16_softmax_table_is_the_c_expression():
    """table[v] = (int)(expf(s * (v - 255)) * 65535 + 0.5) capped at 65535: the top entry is 65535, entries fall
    with v's distance from 255, and the float32 product is what is rounded (checked on a few entries in exact
    rational arithmetic from the float32 value of expf)."""
    from fractions import Fraction
    from mobileqat import integer
    t = integer.softmax_uint16_table(0.0625)
    assert t[255] == 65535 and np.all(np.diff(t) >= 0) and t[0] < 10
    e = integer._expf(np.float32(0.0625) * (np.arange(256, dtype=np.float32) - np.float32(255)))
    for v in (0, 100, 200, 250, 254):
        product = np.float32(e[v] * np.float32(65535))
        assert t[v] == min(65535, int(Fraction(float(product)) + Fraction(1, 2)))


RESIZE_CASES = [((37, 23), (16, 16), "RGB"), ((16, 16), (37, 29), "RGB"), ((100, 64), (32, 32), "L"),
                ((224, 300), (96, 96), "RGB"), ((9, 50), (9, 7), "RGB"), ((40, 12), (13, 12), "L")]


def test_java_core_reads_the_package_as_python_wrote_it(demo, tmp_path):
    """android_demo/core compiled and run on the JVM (JUnit from Debian, core/jvm_test.sh) against this package and
    Pillow resize fixtures: every golden PNG preprocessed in Java gives the stored int8 tensor byte for byte (the
    PNGs are 32 px, the input 16 px: the resize is exercised), Pillow's BILINEAR reproduced on enlarging and
    reducing cases (RGB and L), the stored reference/XNNPACK codes compare as the manifest says, and truncated or
    replaced files are named."""
    pkg = demo[0]
    assert shutil.which("javac"), "javac not found: the Android demo's core is tested on a JDK (17)"
    rng = np.random.default_rng(0)
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    for k, (src, dst, mode) in enumerate(RESIZE_CASES):
        channels = 3 if mode == "RGB" else 1
        pixels = rng.integers(0, 256, (src[1], src[0], channels), dtype=np.uint8)
        im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        im.save(fixtures / f"{k}_src.png")
        dc.write_tensor(fixtures / f"{k}_dst.bin",
                     np.asarray(im.resize(dst, Image.BILINEAR)).reshape(dst[1], dst[0], channels))
    script = pathlib.Path(__file__).resolve().parents[1] / "android_demo" / "core" / "jvm_test.sh"
    r = subprocess.run(["bash", str(script), str(pkg), str(fixtures)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "OK (5 tests)" in r.stdout, (r.stdout + r.stderr)[-4000:]
