"""``mobileqat device-check PKG``: check a model package on the device. Needs numpy, Pillow, ai-edge-litert.

This module imports nothing else (no TensorFlow, no other mobileqat module), so it runs on a Raspberry Pi,
an ARM board or under QEMU with only those three installed; it can be copied alone and run as
``python device_check.py PKG``. It:

1. reads manifest.json and checks the size and sha256 of every file the manifest lists (model.tflite,
   labels.txt, golden/*), and that each golden tensor file is whole (``read_tensor``);
2. preprocesses every golden PNG itself, as the manifest says (Pillow decode, RGB or L, BILINEAR resize,
   pixel scaling in float32, quantization), and checks it gets the stored input tensors exactly;
3. runs the stored input tensors on the reference kernels and on XNNPACK and compares the output codes
   with the stored ones (bit for bit: agreement, max LSB);
4. measures latency (median and p90 of ``--runs`` invokes at batch 1, ``--threads`` threads).

Exit codes: 0 pass; 1 a mismatch (inputs or output codes); 2 a package that is missing, corrupt,
truncated or has a wrong sha256 (the message names the file and says what to do).

Golden tensor file format (``.bin``, little endian): magic ``MQGT`` (4 bytes), uint32 version (1),
uint32 dtype code (``DTYPES``: 1 int8, 2 uint8, 3 int16, 4 int32, 5 float32), uint32 rank, rank x uint32
dims, then the elements in C order; the file is exactly 16 + 4 * rank + prod(dims) * itemsize bytes.
"""
import argparse
import hashlib
import json
import os
import struct
import sys
import time

import numpy as np

MAGIC = b"MQGT"
VERSION = 1
DTYPES = {1: np.dtype("int8"), 2: np.dtype("uint8"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<f4")}
DTYPE_CODES = {v.name: k for k, v in DTYPES.items()}
FORMAT = "mobileqat-package"
RUNTIMES = ("reference", "xnnpack")


class PackageError(Exception):
    """A package that cannot be checked: missing, corrupt, truncated or a wrong sha256 (exit code 2)."""


def write_tensor(path, array):
    """``array`` (int8/uint8/int16/int32/float32) -> golden tensor bytes at ``path`` (see module doc)."""
    a = np.ascontiguousarray(array)
    if a.dtype.name not in DTYPE_CODES:
        raise ValueError(f"{path}: dtype {a.dtype} has no golden code; use one of {sorted(DTYPE_CODES)}.")
    code = DTYPE_CODES[a.dtype.name]
    head = MAGIC + struct.pack("<III", VERSION, code, a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
    with open(path, "wb") as f:
        f.write(head + a.astype(DTYPES[code], copy=False).tobytes())


def read_tensor(path):
    """A golden tensor file -> numpy array; PackageError naming the file when it is not whole."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PackageError(f"{path}: cannot read ({e.strerror or e}); copy the package again.") from e
    if len(data) < 16 or data[:4] != MAGIC:
        raise PackageError(f"{path}: not a golden tensor file (no {MAGIC!r} header); copy the package again.")
    version, code, rank = struct.unpack_from("<III", data, 4)
    if version != VERSION or code not in DTYPES or rank > 8:
        raise PackageError(f"{path}: unknown header (version {version}, dtype code {code}, rank {rank}); "
                           f"this checker reads version {VERSION}.")
    if len(data) < 16 + 4 * rank:
        raise PackageError(f"{path}: truncated in its header; copy the package again.")
    shape = struct.unpack_from(f"<{rank}I", data, 16)
    start, dtype = 16 + 4 * rank, DTYPES[code]
    want = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != want:
        raise PackageError(f"{path}: {len(data)} bytes, but its header {list(shape)} {dtype.name} needs {want}: "
                           f"{'truncated' if len(data) < want else 'trailing bytes'}; copy the package again.")
    return np.frombuffer(data, dtype, offset=start).reshape(shape)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(pkg):
    """manifest.json of package folder ``pkg`` as a dict, after checking every file it lists (size, sha256)."""
    path = os.path.join(pkg, "manifest.json")
    if not os.path.isdir(pkg):
        raise PackageError(f"{pkg}: no such package folder; pass the folder `mobileqat export --out` wrote.")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; {pkg} is not a mobileqat package (write one with "
                           "`mobileqat export QAT_MODEL --out PKG`).") from None
    except (OSError, ValueError) as e:
        raise PackageError(f"{path}: not readable JSON ({e}); the copy is corrupt or truncated, copy it again.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a {FORMAT} manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}).")
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.tflite" not in files:
        raise PackageError(f"{path}: has no 'files' table with model.tflite; re-export the package.")
    model = manifest.get("model", {})
    if model.get("sha256") != files["model.tflite"].get("sha256"):
        raise PackageError(f"{path}: model.sha256 and files['model.tflite'] disagree; re-export the package.")
    for rel, entry in files.items():
        full = os.path.join(pkg, *rel.split("/"))
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise PackageError(f"{path}: file entry {rel!r} leaves the package; re-export the package.")
        if not os.path.isfile(full):
            raise PackageError(f"{full}: missing (listed in manifest.json); copy the whole package folder.")
        size = os.path.getsize(full)
        if size != entry.get("bytes"):
            raise PackageError(f"{full}: {size} bytes, manifest.json says {entry.get('bytes')}: "
                               f"{'truncated' if size < (entry.get('bytes') or 0) else 'changed'}; copy it again.")
        digest = sha256(full)
        if digest != entry.get("sha256"):
            raise PackageError(f"{full}: sha256 {digest[:16]}... differs from manifest.json's "
                               f"{str(entry.get('sha256'))[:16]}...: the file is corrupt or was replaced; copy "
                               "the package again (or re-export it).")
    return manifest


def preprocess(path, prep, input_spec):
    """One image file -> the model's input tensor (H, W, C) in its dtype, as manifest["preprocessing"] says.

    Pillow decodes; EXIF orientation is applied; the image becomes 'RGB' (alpha composited onto black) or
    'L'; it is resized to (width, height) with Image.BILINEAR unless it has that size; pixels 0..255 are
    scaled in float32 (``pixels``: "-1..1" x/127.5 - 1, "0..1" x/255, "0..255" x, "mean_std" (x - mean) /
    std); then quantized: round(x / scale) half away from zero, + zero_point, clamped (float64)."""
    from PIL import Image, ImageOps
    h, w = prep["resize"]["height"], prep["resize"]["width"]
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"), np.float32)
            im = Image.fromarray(np.round(rgba[..., :3] * (rgba[..., 3:] / np.float32(255.0))).astype(np.uint8), "RGB")
        im = im.convert("RGB")
        if prep["color"] == "L":
            im = im.convert("L")
        if im.size != (w, h):
            if prep["resize"]["method"] != "bilinear":
                raise PackageError(f"resize method {prep['resize']['method']!r} is not one this checker knows.")
            im = im.resize((w, h), Image.BILINEAR)
        x = np.asarray(im, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    pixels = prep["pixels"]
    if pixels == "-1..1":
        x = x / np.float32(127.5) - np.float32(1.0)
    elif pixels == "0..1":
        x = x / np.float32(255.0)
    elif pixels == "mean_std":
        x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    elif pixels != "0..255":
        raise PackageError(f"pixel scaling {pixels!r} is not one this checker knows.")
    dtype = np.dtype(input_spec["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    v = x.astype(np.float64) / input_spec["scale"]
    q = np.sign(v) * np.floor(np.abs(v) + 0.5) + input_spec["zero_point"]
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def _resolver(runtime):
    from ai_edge_litert.interpreter import OpResolverType
    return {"reference": OpResolverType.BUILTIN_REF, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            "xnnpack": OpResolverType.AUTO}[runtime]


def interpreter(model_path, runtime, threads=1):
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter(model_path=os.fspath(model_path), num_threads=threads,
                       experimental_op_resolver_type=_resolver(runtime))


def invoke_codes(model_path, runtime, threads, codes):
    """Input tensors (N, ...) in the input dtype -> output tensors (N, ...) of ``runtime``, one image at a time
    (batch 1, as a device runs)."""
    it = interpreter(model_path, runtime, threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.allocate_tensors()
    rows = []
    for x in codes:
        it.set_tensor(inp["index"], np.ascontiguousarray(x[None]))
        it.invoke()
        rows.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(rows) if rows else np.zeros((0,) + tuple(out["shape"][1:]), out["dtype"])


def with_output(model_bytes, tensor):
    """The .tflite bytes with the graph output (subgraph 0, output 0) set to tensor index ``tensor``: an
    intermediate tensor becomes what ``invoke`` returns, on every runtime, XNNPACK included (a delegate's
    intermediates are otherwise invisible). An in-place edit of one int32 of the flatbuffer."""
    buf = bytearray(model_bytes)

    def u32(p):
        return struct.unpack_from("<I", buf, p)[0]

    def field(table, k):  # absolute position of field k of the table at ``table``
        vtable = table - struct.unpack_from("<i", buf, table)[0]
        size = struct.unpack_from("<H", buf, vtable)[0]
        off = struct.unpack_from("<H", buf, vtable + 4 + 2 * k)[0] if 4 + 2 * k < size else 0
        if not off:
            raise PackageError("model.tflite: no subgraph outputs in the flatbuffer")
        return table + off
    try:
        root = u32(0)
        p = field(root, 2)  # Model.subgraphs
        vec = p + u32(p)
        first = vec + 4
        subgraph = first + u32(first)
        p = field(subgraph, 2)  # SubGraph.outputs
        outputs = p + u32(p)
        if u32(outputs) < 1:
            raise PackageError("model.tflite: the graph has no output")
        struct.pack_into("<i", buf, outputs + 4, int(tensor))
    except struct.error as e:
        raise PackageError(f"model.tflite: damaged flatbuffer ({e})") from e
    return bytes(buf)


def traced_ops(model_path):
    """[{"index": op index, "op": name, "tensor": output tensor index, "name": tensor name, "bytes": size of
    one image's output}] of every op, in execution order (the reference interpreter's, no delegate)."""
    it = interpreter(model_path, "reference")
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = []
    for op in it._get_ops_details():
        out = int(op["outputs"][0])
        t = tensors.get(out, {})
        size = int(np.prod(t.get("shape", [0])[1:])) * np.dtype(t.get("dtype", np.int8)).itemsize
        ops.append({"index": int(op["index"]), "op": op["op_name"], "tensor": out, "name": t.get("name", ""),
                    "bytes": size})
    return ops


def trace(model_path, runtime, threads, codes, ops):
    """{tensor index: (N, ...) values} of each op's output in ``ops`` (``traced_ops``) on ``runtime`` for input
    tensors ``codes``: the model run once per op with that op's output as the graph output."""
    from ai_edge_litert.interpreter import Interpreter
    with open(model_path, "rb") as f:
        data = f.read()
    out = {}
    for op in ops:
        it = Interpreter(model_content=with_output(data, op["tensor"]), num_threads=threads,
                         experimental_op_resolver_type=_resolver(runtime))
        inp, res = it.get_input_details()[0], it.get_output_details()[0]
        it.allocate_tensors()
        rows = []
        for x in codes:
            it.set_tensor(inp["index"], np.ascontiguousarray(x[None]))
            it.invoke()
            rows.append(it.get_tensor(res["index"])[0].copy())
        out[op["tensor"]] = np.stack(rows)
    return out


def first_op_difference(pkg, manifest, runtime, threads, log, machine=None):
    """Re-run the traced ops (manifest["trace"]: every op, the first trace["images"] golden images) on
    ``runtime``; returns None when every traced tensor equals the stored one, else {"op", "index", "tensor",
    "name", "image", "max_lsb_diff"} of the first op, in execution order, whose output differs on any traced
    image."""
    tr = manifest.get("trace")
    if not tr or runtime not in tr.get("runtimes", ()):
        return "no trace in the package"
    x = read_tensor(os.path.join(pkg, *manifest["golden"]["input"].split("/")))[:tr["images"]]
    ops = tr["ops"]
    mine = trace(os.path.join(pkg, "model.tflite"), runtime, threads, x, ops)
    for op in ops:
        stored = read_tensor(os.path.join(pkg, *op.get(f"{runtime}.{machine}", op[runtime]).split("/")))
        got = mine[op["tensor"]]
        if got.shape != stored.shape or not np.array_equal(got, stored):
            d = np.abs(got.astype(np.int64) - stored.astype(np.int64)) if got.shape == stored.shape else None
            image = int(np.flatnonzero(d.reshape(len(d), -1).max(1))[0]) if d is not None else 0
            return {"op": op["op"], "index": op["index"], "tensor": op["tensor"], "name": op["name"],
                    "image": manifest["golden"]["images"][image], "max_lsb_diff": None if d is None else int(d.max())}
    return None


def latency_ms(model_path, runtime, threads, x, warmup=5, runs=50):
    """Wall times (ms) of ``runs`` invokes at batch 1 on input tensor ``x`` after ``warmup`` invokes."""
    it = interpreter(model_path, runtime, threads)
    inp = it.get_input_details()[0]
    it.allocate_tensors()
    it.set_tensor(inp["index"], np.ascontiguousarray(x[None]))
    for _ in range(warmup):
        it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def compare(got, want):
    """Output codes (N, K) of this device vs the stored ones: identical rows, top-1 agreement, max LSB, first diff."""
    g, w = np.asarray(got, np.int64), np.asarray(want, np.int64)
    diff = np.abs(g - w).reshape(len(g), -1)
    bad = np.flatnonzero(diff.max(axis=1) > 0) if len(g) else np.zeros(0, int)
    first = None
    if len(bad):
        i = int(bad[0])
        k = int(np.argmax(diff[i]))
        first = {"image": i, "output": k, "got": int(g.reshape(len(g), -1)[i, k]), "stored": int(w.reshape(len(w), -1)[i, k])}
    return {"identical": int(len(g) - len(bad)), "images": int(len(g)),
            "top1_agreement": float(np.mean(g.reshape(len(g), -1).argmax(1) == w.reshape(len(w), -1).argmax(1))) if len(g) else 1.0,
            "max_lsb_diff": int(diff.max()) if diff.size else 0, "first_difference": first}


def machine_name():
    """This CPU architecture as the package names it: "aarch64" (also for "arm64"), "x86_64", ..."""
    import platform
    m = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def golden_file(manifest, runtime, machine):
    """The golden output file of ``runtime`` for ``machine``: the machine's own (manifest["golden"]["machines"],
    where its arithmetic differs from the one the package was validated on) or the common one."""
    own = ((manifest["golden"].get("machines") or {}).get(machine) or {}).get(runtime)
    return own or manifest["golden"][runtime]


def check(pkg, threads=1, runs=50, runtimes=RUNTIMES, log=print, trace_ops=False, machine=None):
    """Check package folder ``pkg``. Returns a result dict with "passed" (bool) and per-part numbers; raises
    PackageError for a package that cannot be checked. ``log``: called with each line of the report.
    trace_ops: also compare every traced intermediate tensor (manifest["trace"]) on each runtime; done anyway
    for a runtime whose outputs differ, to name the first op that differs."""
    pkg = os.fspath(pkg)
    manifest = load_manifest(pkg)
    files = manifest["files"]
    log(f"package {pkg}: {len(files)} files, sizes and sha256 as manifest.json says "
        f"(model.tflite {files['model.tflite']['bytes']} bytes, sha256 {manifest['model']['sha256'][:16]}...)")
    golden = manifest.get("golden") or {}
    machine = machine or machine_name()
    try:
        files = {k: golden[k] for k in ("input", "labels")}
        files.update({k: golden_file(manifest, k, machine) for k in runtimes})
        images = list(golden["images"])
    except KeyError as e:
        raise PackageError(f"{pkg}/manifest.json: golden entry {e} missing; re-export the package.") from None
    tensors = {k: read_tensor(os.path.join(pkg, *rel.split("/"))) for k, rel in files.items()}
    for k in runtimes:
        if files[k] != golden[k]:
            log(f"{k}: this machine ({machine}) is held to {files[k]}: "
                f"{golden['machines'][machine].get('source', '')}")
    n = len(images)
    inp_spec = manifest["input"]
    x = tensors["input"]
    if x.shape != (n, *inp_spec["shape"][1:]) or x.dtype.name != inp_spec["dtype"]:
        raise PackageError(f"{golden['input']}: shape {list(x.shape)} {x.dtype.name}, but the manifest has {n} "
                           f"images of {inp_spec['shape'][1:]} {inp_spec['dtype']}; re-export the package.")
    result = {"package": pkg, "images": n, "threads": threads, "runtimes": {}}

    # 2. preprocessing on this device == the stored input tensors
    mismatched = []
    for i, rel in enumerate(images):
        mine = preprocess(os.path.join(pkg, *rel.split("/")), manifest["preprocessing"], inp_spec)
        if mine.shape != x[i].shape or not np.array_equal(mine, x[i]):
            mismatched.append((i, rel, int(np.abs(mine.astype(np.int64) - x[i].astype(np.int64)).max())
                               if mine.shape == x[i].shape else None))
    result["preprocessing"] = {"identical": n - len(mismatched), "images": n,
                               "first_mismatch": mismatched[0][1] if mismatched else None}
    line = f"preprocessing: {n - len(mismatched)}/{n} PNGs give the stored input tensors"
    if mismatched:
        i, rel, d = mismatched[0]
        line += f"; MISMATCH from {rel} (max difference {d} codes)"
    log(line)

    # 3. + 4. both runtimes on the stored inputs, then latency
    model = os.path.join(pkg, "model.tflite")
    labels = tensors["labels"].astype(np.int64)
    for name in runtimes:
        want = tensors[name]
        got = invoke_codes(model, name, threads, x)
        if got.shape != want.shape:
            raise PackageError(f"{files[name]}: shape {list(want.shape)}, but the model outputs {list(got.shape)}; "
                               "re-export the package.")
        c = compare(got, want)
        c["accuracy"] = float(np.mean(got.reshape(n, -1).argmax(1) == labels)) if n else None
        times = latency_ms(model, name, threads, x[0], runs=runs) if n and runs else []
        c["latency_ms"] = {"median": float(np.median(times)), "p90": float(np.percentile(times, 90))} if times else None
        result["runtimes"][name] = c
        line = (f"{name}: {c['identical']}/{n} images give the stored output codes, top-1 agreement "
                f"{100 * c['top1_agreement']:.2f} %, max {c['max_lsb_diff']} LSB; accuracy on the golden labels "
                f"{100 * c['accuracy']:.2f} %")
        if c["latency_ms"]:
            line += (f"; latency median {c['latency_ms']['median']:.3f} ms, p90 {c['latency_ms']['p90']:.3f} ms "
                     f"({threads} thread{'s' if threads > 1 else ''}, {runs} runs)")
        log(line)
        if c["first_difference"]:
            f = c["first_difference"]
            log(f"  first difference on {name}: image {images[f['image']]}, output {f['output']}: "
                f"{f['got']} here, {f['stored']} stored")
    for name in runtimes:
        r = result["runtimes"][name]
        if not (trace_ops or r["identical"] < n) or not manifest.get("trace"):
            continue
        found = first_op_difference(pkg, manifest, name, threads, log, machine)
        tr = manifest["trace"]
        if found is None:
            r["trace"] = {"ops": len(tr["ops"]), "images": tr["images"], "identical": True}
            log(f"{name} per op: all {len(tr['ops'])} op outputs x {tr['images']} images identical to the stored ones"
                + ("" if r["identical"] == n else f" (the images that differ are not among the {tr['images']} traced)"))
        else:
            r["trace"] = {"ops": len(tr["ops"]), "images": tr["images"], "identical": False, "first_difference": found}
            log(f"{name} per op: FIRST OP THAT DIFFERS: op {found['index']} {found['op']} (tensor "
                f"{found['tensor']} '{found['name']}'), image {found['image']}, max {found['max_lsb_diff']} LSB")
    result["passed"] = (not mismatched) and all(r["identical"] == n and r.get("trace", {}).get("identical", True)
                                                for r in result["runtimes"].values())
    return result


def main(argv=None):
    p = argparse.ArgumentParser(prog="mobileqat device-check", description="Check a mobileqat model package on "
                                "this device: sha256, preprocessing, golden output codes on reference kernels "
                                "and XNNPACK, latency. Needs numpy, Pillow and ai-edge-litert only.")
    p.add_argument("package", help="package folder (written by `mobileqat export --out PKG` or `mobileqat run`)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    p.add_argument("--runs", type=int, default=50, help="timed invokes per runtime (0: no latency)")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--trace", action="store_true", help="also compare every op's output on the traced images "
                                                        "(done anyway on a mismatch, to name the first op)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--platform-label", default=None, help="a name for this device in the printed result")
    p.add_argument("--machine", default=None, help="compare with the golden codes of this architecture (default: "
                                                   "this one's, e.g. aarch64; x86_64 = the codes validated on)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.runs < 0:
        p.error("--threads must be >= 1 and --runs >= 0")
    import platform
    label = args.platform_label or f"{platform.machine()} {platform.system()}"
    print(f"device-check on {label}, Python {platform.python_version()}", flush=True)
    try:
        result = check(args.package, args.threads, args.runs, tuple(args.runtimes),
                       log=lambda s: print(s, flush=True), trace_ops=args.trace,
                       machine=args.machine)
    except PackageError as e:
        print(f"device-check: FAIL: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:  # a manifest that parses but lacks an entry
        print(f"device-check: FAIL: {args.package}/manifest.json: malformed ({type(e).__name__}: {e}); "
              "re-export the package.", file=sys.stderr)
        return 2
    result["platform"] = label
    result["machine"] = args.machine or machine_name()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if result["passed"]:
        print(f"device-check: PASS ({result['images']} golden images, {', '.join(args.runtimes)} bit for bit)")
        return 0
    print("device-check: FAIL: this device does not reproduce the golden tensors (lines above name the first "
          "difference)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
