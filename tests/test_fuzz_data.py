"""Property-based and fuzz tests (hypothesis) for ``mobileqat.data.load_image_folder``.

Contract checked for every input: the loader returns a Dataset (x float32 in [-1, 1] of shape
(N, size, size, channels) on the uint8 grid, labels int64), or raises a ValueError/FileNotFoundError
that names the folder and the fix, or lists the file in ``Dataset.skipped`` as (path, reason) -- never
another exception, never a hang (SIGALRM guard), never a decode of more than Image.MAX_IMAGE_PIXELS
pixels (allocation spy on Pillow's core), no numpy RuntimeWarning or leaked DecompressionBombWarning,
UTF-8-encodable messages, and nothing written into the folder. No TensorFlow needed.

The number of inputs tried is printed on the terminal at the end of the module.
"""
import collections
import colorsys
import contextlib
import io
import os
import signal
import stat
import struct
import sys
import tempfile
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from mobileqat import data

TRIED = collections.Counter()  # test name -> number of inputs (examples / parametrized cases) tried


def _tried(name, n=1):
    TRIED[name] += n


@pytest.fixture(scope="module", autouse=True)
def _report_inputs_tried(request):
    """After the module: print how many inputs were tried, past pytest's output capture."""
    yield
    total = sum(TRIED.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items()))
    line = f"[tests/test_fuzz_data.py] {total} inputs tried ({detail})"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}", file=sys.__stderr__, flush=True)


_BASE = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def fuzz(n):
    """Small, deterministic hypothesis settings: n examples, no deadline, no example database on disk."""
    return settings(_BASE, max_examples=n)

EXTS = [".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".PNG", ".JpG"]
MAXPIX = Image.MAX_IMAGE_PIXELS
LEVEL = 1.0 / 127.5  # one 8-bit level in the normalized [-1, 1] range


# ------------------------------------------------------------------------------------------ helpers

class _Hang(BaseException):  # BaseException: the loader's `except Exception` must not swallow it
    pass


@contextlib.contextmanager
def _deadline(seconds=30):
    def fire(signum, frame):
        raise _Hang(f"load_image_folder still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _alloc_spy():
    """Records (function, mode, (w, h)) of every image buffer Pillow's core allocates."""
    core, calls = Image.core, []
    originals = {name: getattr(core, name) for name in ("new", "fill")}

    def spy(name, fn):
        def wrapped(mode, size, *args, **kwargs):
            calls.append((name, mode, tuple(size)))
            return fn(mode, size, *args, **kwargs)
        return wrapped
    for name, fn in originals.items():
        setattr(core, name, spy(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(core, name, fn)


def _snapshot(root):
    """Every entry under root (symlinks not followed) with its lstat identity, to prove nothing is written."""
    root = os.fsencode(root)
    if not os.path.lexists(root):
        return None
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            snap[p] = (s.st_mode, s.st_size, s.st_mtime_ns, s.st_ino)
    s = os.lstat(root)
    snap[root] = (s.st_mode, s.st_mtime_ns)
    return snap


def _expected_layout(root):
    """Independent restatement of the documented layout: {class name: [candidate image paths]}.

    Classes: non-hidden entries of root that are folders (symlinks followed, broken/looping ones are not
    folders); files: non-hidden names with an image extension (any case) found recursively, hidden
    folders and symlinked folders not entered."""
    root = os.fsdecode(os.path.abspath(os.fsdecode(root)))
    layout = {}
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(p):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in
                      (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")]
        layout[name] = sorted(files)
    return layout


def _utf8(text):
    text.encode("utf-8")  # raises UnicodeEncodeError on raw surrogates
    return text


def _load(root, **kw):
    """Run the loader under every guard; returns ("ok", Dataset, warnings) or ("error", exc, warnings)."""
    before = _snapshot(root)
    with warnings.catch_warnings(record=True) as rec, _alloc_spy() as allocs, _deadline():
        warnings.simplefilter("always")
        try:
            out = ("ok", data.load_image_folder(root, **kw))
        except (ValueError, FileNotFoundError) as e:
            out = ("error", e)
    assert _snapshot(root) == before, "the loader wrote into the folder"
    too_big = [a for a in allocs if a[2][0] * a[2][1] > MAXPIX]
    assert not too_big, f"decoded an image over MAX_IMAGE_PIXELS: {too_big}"
    for w in rec:
        msg = str(w.message)
        _utf8(msg)
        assert not issubclass(w.category, (Image.DecompressionBombWarning, RuntimeWarning)), msg
        assert issubclass(w.category, UserWarning), (w.category, msg)
    ours = [w for w in rec if str(w.message).startswith("load_image_folder(")]
    assert len(ours) <= 1
    if out[0] == "ok":
        ds = out[1]
        assert len(ours) == (1 if ds.skipped else 0)
        if ds.skipped:
            msg = str(ours[0].message)
            assert f"skipped {len(ds.skipped)} unreadable" in msg and "delete or re-save" in msg
            assert data._shown(ds.skipped[0][0]) in msg
    else:
        msg = _utf8(str(out[1]))
        shown_root = data._shown(os.path.abspath(os.fsdecode(root)))
        assert shown_root in msg.replace("\\\\", "\\"), msg
        assert any(w in msg for w in ("use ", "lay it out", "add ", "pass ", "remove", "check ")), msg
    return out[0], out[1], rec


def _check_dataset(ds, size, channels, root):
    """Shape/dtype/range/label invariants plus: every candidate file is loaded or skipped, exactly once."""
    layout = _expected_layout(root)
    assert ds.class_names == list(layout)
    assert len(ds.class_names) >= 2
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), size, size, channels)
        assert np.isfinite(x).all() and (x >= -1).all() and (x <= 1).all()
        levels = (x.astype(np.float64) + 1.0) * 127.5
        assert np.abs(levels - np.round(levels)).max(initial=0) < 1e-3  # from uint8 pixels
        assert ((y >= 0) & (y < len(ds.class_names))).all()
    candidates = [p for files in layout.values() for p in files]
    for path, reason in ds.skipped:
        assert path in candidates and isinstance(reason, str) and reason.strip()
        _utf8(reason)
    assert len(set(p for p, _ in ds.skipped)) == len(ds.skipped)
    return layout


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width, height, depth, ctype, raw_rows=b"", plte=None):
    """A PNG written by hand (16-bit colour, or only a header claiming any size)."""
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, 0))
    if plte is not None:
        out += _chunk(b"PLTE", plte)
    return out + _chunk(b"IDAT", zlib.compress(raw_rows or b"\0" * 64)) + _chunk(b"IEND", b"")


def _png16(arr, ctype):
    """(H, W, C) uint16 -> 16-bit PNG (ctype 2: RGB, 6: RGBA)."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\0" + arr[r].astype(">u2").tobytes() for r in range(h))
    return _png(w, h, 16, ctype, rows)


def _fix_png_crcs(blob):
    """Recompute every chunk CRC so that a mutated PNG reaches the decoder instead of the CRC check."""
    if not blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return blob
    out, pos = bytearray(blob[:8]), 8
    while pos + 8 <= len(blob):
        n = struct.unpack(">I", blob[pos:pos + 4])[0]
        end = pos + 8 + n
        if end + 4 > len(blob):
            out += blob[pos:]
            return bytes(out)
        out += blob[pos:end] + struct.pack(">I", zlib.crc32(blob[pos + 4:end]))
        pos = end + 4
    return bytes(out + blob[pos:])


def _solid_png(value, size=(9, 9), mode="RGB"):
    return _encode(Image.new(mode, size, value), "PNG")


def _make_root(tmp, files, name=b"root"):
    """files: {relative bytes path: blob}; returns the root as a str path (surrogate-escaped if need be)."""
    root = os.path.join(os.fsencode(tmp), name)
    for rel, blob in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(blob)
    return os.fsdecode(root)


# --------------------------------------------------------------------------- valid sample encodings

def _valid_samples():
    rng = np.random.default_rng(20240601)

    def u8(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    pal = Image.fromarray(u8(10, 12, 3), "RGB").quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    anim = [Image.fromarray(u8(10, 12, 3), "RGB").quantize(8) for _ in range(3)]
    pages = [Image.fromarray(u8(9, 11), "L"), Image.fromarray(u8(13, 7, 3), "RGB")]
    s = {
        "png_rgb": (".png", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "PNG")),
        "png_rgba": (".png", _encode(Image.fromarray(u8(10, 12, 4), "RGBA"), "PNG")),
        "png_l": (".png", _encode(Image.fromarray(u8(10, 12), "L"), "PNG")),
        "png_la": (".png", _encode(Image.fromarray(u8(10, 12, 2), "LA"), "PNG")),
        "png_1": (".png", _encode(Image.fromarray(u8(10, 12), "L").convert("1"), "PNG")),
        "png_p": (".png", _encode(pal, "PNG")),
        "png_p_trns": (".png", _encode(pal, "PNG", transparency=bytes(range(0, 256, 16)))),
        "png_i16": (".png", _encode(Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16)), "PNG")),
        "png_rgb16": (".png", _png16(rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16), 2)),
        "png_rgba16": (".png", _png16(rng.integers(0, 65536, (10, 12, 4), dtype=np.uint16), 6)),
        "png_exif": (".png", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "PNG", exif=exif)),
        "jpg_rgb": (".jpg", _encode(Image.fromarray(u8(16, 20, 3), "RGB"), "JPEG", quality=90)),
        "jpg_l": (".jpg", _encode(Image.fromarray(u8(16, 20), "L"), "JPEG")),
        "jpg_cmyk": (".jpg", _encode(Image.fromarray(u8(16, 20, 4), "CMYK"), "JPEG")),
        "jpg_progressive": (".jpg", _encode(Image.fromarray(u8(16, 20, 3), "RGB"), "JPEG", progressive=True)),
        "jpg_exif": (".jpg", _encode(Image.fromarray(u8(16, 20, 3), "RGB"), "JPEG", exif=exif)),
        "gif_p": (".gif", _encode(pal, "GIF")),
        "gif_trns": (".gif", _encode(pal, "GIF", transparency=3)),
        "gif_anim": (".gif", _encode(anim[0], "GIF", save_all=True, append_images=anim[1:], duration=10)),
        "bmp_rgb": (".bmp", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "BMP")),
        "bmp_p": (".bmp", _encode(pal, "BMP")),
        "bmp_1": (".bmp", _encode(Image.fromarray(u8(10, 12), "L").convert("1"), "BMP")),
        "webp_rgb": (".webp", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "WEBP")),
        "webp_rgba_lossless": (".webp", _encode(Image.fromarray(u8(10, 12, 4), "RGBA"), "WEBP", lossless=True)),
        "tif_rgb": (".tif", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "TIFF")),
        "tif_deflate": (".tiff", _encode(Image.fromarray(u8(10, 12, 3), "RGB"), "TIFF",
                                         compression="tiff_adobe_deflate")),
        "tif_cmyk": (".tif", _encode(Image.fromarray(u8(10, 12, 4), "CMYK"), "TIFF")),
        "tif_ycbcr": (".tif", _encode(Image.fromarray(u8(10, 12, 3), "YCbCr"), "TIFF")),
        "tif_f": (".tif", _encode(Image.fromarray(rng.normal(0, 300, (10, 12)).astype(np.float32), "F"), "TIFF")),
        "tif_i": (".tif", _encode(Image.fromarray(rng.integers(-9, 99999, (10, 12)).astype(np.int32), "I"), "TIFF")),
        "tif_pages": (".tif", _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])),
    }
    lab = Image.new("LAB", (12, 10))
    lab.putdata([tuple(int(v) for v in px) for px in u8(120, 3)])
    s["tif_lab"] = (".tif", _encode(lab, "TIFF"))
    return s


VALID = _valid_samples()
VALID_NAMES = sorted(VALID)


def test_valid_samples_all_load():
    """Sanity for the fuzz seeds: every pristine sample loads (nothing skipped), in both channel modes."""
    files = {b"b/ref.png": _solid_png((1, 2, 3))}
    for i, name in enumerate(VALID_NAMES):
        ext, blob = VALID[name]
        files[f"a/{i:02d}_{name}{ext}".encode()] = blob
    for channels in (1, 3):
        _tried("valid_samples_all_load", len(VALID))
        with tempfile.TemporaryDirectory() as tmp:
            root = _make_root(tmp, files)
            kind, ds, _ = _load(root, image_size=12, channels=channels, test_fraction=0.0)
            assert kind == "ok", ds
            _check_dataset(ds, 12, channels, root)
            assert ds.skipped == []
            assert len(ds.x_train) == len(VALID) + 1


# ---------------------------------------------------------------------------------- byte-level fuzz

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"RIFF\x00\x01\x00\x00WEBPVP8L", b"\x00\x00\x01\x00", b"P6\n",
         b"%!PS-Adobe-3.0 EPSF-3.0\n", b"8BPS", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"]


def _one_fuzz_file(blob, ext, image_size=10, channels=3):
    """Class a: a valid reference + the fuzz file; class b: a valid reference. Must always load."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/ref.png": _solid_png((10, 20, 30)), b"b/ref.png": _solid_png((200, 100, 0)),
                                b"a/fuzz" + ext.encode(): blob})
        kind, ds, _ = _load(root, image_size=image_size, channels=channels, test_fraction=0.0)
        assert kind == "ok", ds
        _check_dataset(ds, image_size, channels, root)
        fuzz = os.path.join(root, "a", "fuzz" + ext)
        assert [p for p, _ in ds.skipped] in ([], [fuzz])
        assert len(ds.x_train) + len(ds.skipped) == 3
        assert np.bincount(ds.y_train, minlength=2)[1] == 1
        return ds


@fuzz(300)
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=600), ext=st.sampled_from(EXTS),
       channels=st.sampled_from([1, 3]))
def test_fuzz_random_bytes(prefix, body, ext, channels):
    _tried("fuzz_random_bytes")
    _one_fuzz_file(prefix + body, ext, channels=channels)


@fuzz(400)
@given(name=st.sampled_from(VALID_NAMES), cut=st.integers(0, 1 << 20), channels=st.sampled_from([1, 3]))
def test_fuzz_truncated_valid_images(name, cut, channels):
    _tried("fuzz_truncated_valid_images")
    ext, blob = VALID[name]
    cut %= len(blob)  # strictly shorter than the valid file
    ds = _one_fuzz_file(blob[:cut], ext, channels=channels)
    if cut < 8:  # not even a signature: certainly unreadable
        assert len(ds.skipped) == 1 and ds.skipped[0][1]


@fuzz(500)
@given(name=st.sampled_from(VALID_NAMES),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6),
       head_only=st.booleans(), fix_crc=st.booleans(), cut=st.none() | st.integers(0, 1 << 20),
       size=st.integers(8, 20))
def test_fuzz_mutated_valid_images(name, edits, head_only, fix_crc, cut, size):
    _tried("fuzz_mutated_valid_images")
    ext, blob = VALID[name]
    b = bytearray(blob)
    for pos, val in edits:
        b[pos % (min(len(b), 64) if head_only else len(b))] = val  # head_only: header fields, dimensions
    b = bytes(b)
    if cut is not None:
        b = b[:cut % (len(b) + 1)]
    if fix_crc:
        b = _fix_png_crcs(b)
    _one_fuzz_file(b, ext, image_size=size)


# ------------------------------------------------------------------------------ decompression bombs

def _bomb(fmt, w, h):
    """A small file whose header claims w x h pixels."""
    if fmt == "png":
        return _png(w, h, 8, 2)
    if fmt == "png_palette":
        return _png(w, h, 8, 3, plte=bytes(range(48)))
    if fmt == "gif":
        return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
                + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x4c\x01\x00;")
    if fmt == "bmp":
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64
    if fmt == "tiff":
        tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, h), (279, 4, 1, 64)]
        ifd = struct.pack("<H", len(tags)) + b"".join(
            struct.pack("<HHI", t, typ, n) + (struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v))
            for t, typ, n, v in tags) + struct.pack("<I", 0)
        return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 64
    if fmt == "jpg":
        b = bytearray(VALID["jpg_rgb"][1])
        sof = b.index(b"\xff\xc0")
        b[sof + 5:sof + 9] = struct.pack(">HH", h, w)
        return bytes(b)
    raise AssertionError(fmt)


BOMB_FMTS = ["png", "png_palette", "gif", "bmp", "tiff", "jpg"]


@st.composite
def _bomb_dims(draw):
    """(w, h) with w * h > MAX_IMAGE_PIXELS, both <= 65535 (GIF/JPEG limit): mostly between 1x and 2x."""
    if draw(st.booleans()):
        return draw(st.sampled_from([(60000, 60000), (20000, 20000), (10000, 10000), (9460, 9460),
                                     (65535, 1366), (1366, 65535), (12000, 12000)]))
    w = draw(st.integers(MAXPIX // 65535 + 1, 65535))
    h = draw(st.integers(MAXPIX // w + 1, min(65535, 2 * MAXPIX // w)))
    return w, h


@fuzz(100)
@given(fmt=st.sampled_from(BOMB_FMTS), dims=_bomb_dims(), ext=st.sampled_from(EXTS),
       channels=st.sampled_from([1, 3]))
def test_decompression_bomb_headers_are_skipped_undecoded(fmt, dims, ext, channels):
    _tried("decompression_bomb_headers")
    w, h = dims
    assert w * h > MAXPIX
    blob = _bomb(fmt, w, h)
    with warnings.catch_warnings():  # the header really claims w x h (Pillow refuses it on open)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises((Image.DecompressionBombWarning, Image.DecompressionBombError)):
            Image.open(io.BytesIO(blob))
    ds = _one_fuzz_file(blob, ext, channels=channels)  # _load: no allocation > MAXPIX, no leaked warning
    assert len(ds.skipped) == 1
    assert "DecompressionBomb" in ds.skipped[0][1] and "exceeds limit" in ds.skipped[0][1]


def _halves(mode, size, left, right):
    """An image of ``mode`` whose left half is ``left`` and right half ``right`` (Pillow pixel values)."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def _hot(im, pixels):
    for xy, value in pixels.items():
        im.putpixel(xy, value)
    return im


def _pal_halves(size, trns):
    im = Image.new("P", size, 1)
    im.putpalette([0, 0, 0, 250, 20, 40, 10, 200, 90] + [0] * (253 * 3))
    im.paste(2, (size[0] // 2, 0, size[0], size[1]))
    return im, ({"transparency": bytes([255, 128, 255])} if trns else {})


BIG = (2100, 2100)  # 4.4 Mpx: above the loader's shrink threshold, small enough to build quickly
BIG_CASES = {
    # name: (() -> (image, save kwargs), ext, expected left RGB, expected right RGB); built lazily
    "rgba": (lambda: (_halves("RGBA", BIG, (200, 100, 50, 128), (10, 250, 90, 255)), {}), ".png",
             (100, 50, 25), (10, 250, 90)),
    "la": (lambda: (_halves("LA", BIG, (180, 64), (30, 255)), {}), ".png", (45,) * 3, (30,) * 3),
    "p_trns": (lambda: _pal_halves(BIG, True), ".png", (125, 10, 20), (10, 200, 90)),
    "p": (lambda: _pal_halves(BIG, False), ".png", (250, 20, 40), (10, 200, 90)),
    "i16": (lambda: (_halves("I;16", BIG, 257 * 40, 257 * 220), {}), ".png", (40,) * 3, (220,) * 3),
    "one": (lambda: (_halves("1", BIG, 0, 1), {}), ".png", (0,) * 3, (255,) * 3),
    "l_wide": (lambda: (_halves("L", (40000, 111), 33, 199), {}), ".png", (33,) * 3, (199,) * 3),
    "i_tiff": (lambda: (_halves("I", BIG, 5140, 51400), {"compression": "tiff_adobe_deflate"}), ".tif",
               (20,) * 3, (200,) * 3),
    "f_tiff": (lambda: (_halves("F", BIG, 0.25, 1.0), {"compression": "tiff_adobe_deflate"}), ".tif",
               (64,) * 3, (255,) * 3),
    # one hot pixel decides the rule for the whole image (full-resolution max, not the box-averaged one)
    "i_hot": (lambda: (_hot(_halves("I", BIG, 200, 100), {(1050, 1050): 60000}), {"compression": "tiff_adobe_deflate"}),
              ".tif", (1,) * 3, (0,) * 3),
    "f_hot": (lambda: (_hot(_halves("F", BIG, 0.8, 0.2), {(1050, 1050): 3.0}), {"compression": "tiff_adobe_deflate"}),
              ".tif", (1,) * 3, (0,) * 3),
    "f_nonfinite": (lambda: (_hot(_halves("F", BIG, 0.8, 0.2), {(1050, 1050): float("nan"), (1000, 1060): float("inf"),
                                                               (1070, 1000): float("-inf")}),
                             {"compression": "tiff_adobe_deflate"}), ".tif", (204,) * 3, (51,) * 3),
    "cmyk_jpeg": (lambda: (_halves("CMYK", (2400, 1800), (0, 255, 255, 0), (255, 0, 255, 0)), {"quality": 95}),
                  ".jpg",
                  (255, 0, 0), (0, 255, 0)),
}


@pytest.mark.parametrize("case", sorted(BIG_CASES))
def test_big_images_load_without_big_numpy_temporaries(case):
    """A 4.3-4.4 Mpx image (any mode) loads correctly with < 16 MB of numpy temporaries: it is box-reduced
    in its own mode before the float conversion (which costs 16-48 bytes per source pixel)."""
    _tried("big_images_bounded_memory")
    build, ext, left, right = BIG_CASES[case]
    im, kw = build()
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/big" + ext.encode(): b"", b"b/ref.png": _solid_png((1, 2, 3))})
        im.save(os.path.join(root, "a", "big" + ext), **kw)
        tracemalloc.start()
        try:
            kind, ds, _ = _load(root, image_size=16, channels=3, test_fraction=0.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert kind == "ok", ds
        _check_dataset(ds, 16, 3, root)
        assert ds.skipped == []
        assert peak < 16e6, f"{case}: {peak / 1e6:.0f} MB of Python/numpy allocations for one image"
        img = (ds.x_train[ds.y_train == 0][0].astype(np.float64) + 1) * 127.5
        tol = 6 if ext == ".jpg" else 1.01
        np.testing.assert_allclose(img[:, :6], np.broadcast_to(left, (16, 6, 3)), atol=tol)
        np.testing.assert_allclose(img[:, -6:], np.broadcast_to(right, (16, 6, 3)), atol=tol)


# --------------------------------------------------------------------------------- modes, exactly

def _mode_case(mode, rng, s):
    """(blob, ext, expected RGB levels (s, s, 3) float, tolerance in levels, gray) for a file of ``mode``."""
    def u8(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if mode == "1":
        a = u8(s, s) // 128 * 255
        return _encode(Image.fromarray(a, "L").convert("1"), "PNG"), ".png", np.repeat(a[..., None], 3, 2), 0
    if mode == "L":
        a = u8(s, s)
        return _encode(Image.fromarray(a, "L"), "PNG"), ".png", np.repeat(a[..., None], 3, 2), 0
    if mode == "LA":
        a = u8(s, s, 2).astype(np.float64)
        exp = np.round(a[..., 0] * a[..., 1] / 255)
        return (_encode(Image.fromarray(a.astype(np.uint8), "LA"), "PNG"), ".png",
                np.repeat(exp[..., None], 3, 2), 0)
    if mode in ("P", "P_trns_png", "P_key_gif", "PA_tiff", "P_bmp"):
        pal = u8(256, 3)
        idx = rng.integers(0, 256 if mode not in ("P_key_gif",) else 64, (s, s)).astype(np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(pal.tobytes())
        exp = pal[idx].astype(np.float64)
        if mode == "P":
            return _encode(im, "PNG"), ".png", exp, 0
        if mode == "P_bmp":
            return _encode(im, "BMP"), ".bmp", exp, 0
        if mode == "P_trns_png":
            alpha = u8(256)
            exp = np.round(exp * alpha[idx][..., None].astype(np.float64) / 255)
            return _encode(im, "PNG", transparency=alpha.tobytes()), ".png", exp, 0
        if mode == "P_key_gif":
            key = int(idx[0, 0])
            pal64 = pal[:64]
            im.putpalette(pal64.tobytes())
            exp = pal64[idx].astype(np.float64)
            exp[idx == key] = 0
            return _encode(im, "GIF", transparency=key, optimize=False), ".gif", exp, 0
        alpha = u8(s, s)
        pa = Image.merge("PA", (Image.fromarray(idx, "L"), Image.fromarray(alpha, "L")))
        pa.putpalette(pal.tobytes())
        exp = np.round(exp * alpha[..., None].astype(np.float64) / 255)
        return _encode(pa, "TIFF"), ".tif", exp, 0
    if mode in ("RGB", "RGB_bmp", "RGB_tiff", "RGB_webp_lossless"):
        a = u8(s, s, 3)
        fmt, ext, kw = {"RGB": ("PNG", ".png", {}), "RGB_bmp": ("BMP", ".bmp", {}),
                        "RGB_tiff": ("TIFF", ".tiff", {}),
                        "RGB_webp_lossless": ("WEBP", ".webp", {"lossless": True, "exact": True})}[mode]
        return _encode(Image.fromarray(a, "RGB"), fmt, **kw), ext, a.astype(np.float64), 0
    if mode == "RGBA":
        a = u8(s, s, 4).astype(np.float64)
        exp = np.round(a[..., :3] * a[..., 3:] / 255)
        return _encode(Image.fromarray(a.astype(np.uint8), "RGBA"), "PNG"), ".png", exp, 0
    if mode == "CMYK":
        a = u8(s, s, 4).astype(np.float64)
        exp = (255 - a[..., :3]) * (255 - a[..., 3:]) / 255
        return _encode(Image.fromarray(a.astype(np.uint8), "CMYK"), "TIFF"), ".tif", exp, 1
    if mode == "YCbCr":
        a = u8(s, s, 3).astype(np.float64)
        y, cb, cr = a[..., 0], a[..., 1] - 128, a[..., 2] - 128
        exp = np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0, 255)
        return _encode(Image.fromarray(a.astype(np.uint8), "YCbCr"), "TIFF"), ".tif", exp, 1.5
    if mode == "LAB":  # neutral a = b = 0 (stored 128): CIE L* -> sRGB grey, by the textbook formula
        lum = u8(s, s).astype(np.float64)
        im = Image.new("LAB", (s, s))
        im.putdata([(int(v), 128, 128) for v in lum.ravel()])
        ls = lum / 255 * 100
        yy = np.where(ls > 8, ((ls + 16) / 116) ** 3, ls / 903.3)
        grey = 255 * np.where(yy <= 0.0031308, 12.92 * yy, 1.055 * yy ** (1 / 2.4) - 0.055)
        return _encode(im, "TIFF"), ".tif", np.repeat(grey[..., None], 3, 2), 2  # lcms vs textbook: <= 1.7
    if mode in ("I;16", "I;16B"):
        v = rng.integers(0, 65536, (s, s), dtype=np.uint16)
        if mode == "I;16":
            blob, ext = _encode(Image.fromarray(v), "PNG"), ".png"
        else:
            im = Image.frombytes("I;16B", (s, s), v.astype(">u2").tobytes())
            blob, ext = _encode(im, "TIFF"), ".tif"
        return blob, ext, np.repeat(np.round(v / 257.0)[..., None], 3, 2), 0
    if mode == "RGB16":
        v = rng.integers(0, 65536, (s, s, 3), dtype=np.uint16)
        return _png16(v, 2), ".png", v / 257.0, 1
    if mode == "RGBA16":
        v = rng.integers(0, 65536, (s, s, 4), dtype=np.uint16).astype(np.float64)
        return _png16(v.astype(np.uint16), 6), ".png", (v[..., :3] / 257) * (v[..., 3:] / 257) / 255, 2
    if mode in ("I", "F"):
        kind = rng.integers(4)
        if mode == "I":
            v = (rng.integers(0, 256, (s, s)) if kind < 2 else
                 rng.integers(-70000, 2 ** 31 - 1 if kind == 2 else 70000, (s, s))).astype(np.int32)
        else:
            v = [rng.uniform(0, 1, (s, s)), rng.uniform(0, 255, (s, s)), rng.uniform(-500, 70000, (s, s)),
                 rng.uniform(0, 1, (s, s))][kind].astype(np.float32)
            if kind == 3:  # non-finite pixels: NaN -> 0, +inf -> largest finite value, -inf -> 0
                v.ravel()[rng.choice(s * s, 3, replace=False)] = [np.nan, np.inf, -np.inf]
        exp = _expected_wide_levels(v, mode)
        return _encode(Image.fromarray(v, mode), "TIFF"), ".tif", np.repeat(exp[..., None], 3, 2), 0
    raise AssertionError(mode)


def _expected_wide_levels(v, mode):
    """The documented 'I'/'F' rule: 8-bit values if max <= 255, 16-bit (/ 257) above, 'F' with max <= 1
    as [0, 1]; F NaN -> 0, +inf -> the largest finite value, -inf -> 0; clipped to 0..255."""
    f = v.astype(np.float64)
    finite = np.isfinite(f)
    top = f[finite].max() if finite.any() else 0.0
    f = np.where(np.isnan(f), 0.0, np.minimum(f, top))
    f = np.where(np.isneginf(f), 0.0, f)
    scaled = f / 257 if top > 255 else (f * 255 if (mode == "F" and top <= 1) else f)
    return np.clip(np.round(scaled), 0, 255)


FILE_MODES = ["1", "L", "LA", "P", "P_trns_png", "P_key_gif", "PA_tiff", "P_bmp", "RGB", "RGB_bmp", "RGB_tiff",
              "RGB_webp_lossless", "RGBA", "CMYK", "YCbCr", "LAB", "I", "I;16", "I;16B", "F", "RGB16", "RGBA16"]


def _grey_levels(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


@fuzz(250)
@given(mode=st.sampled_from(FILE_MODES), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 32 - 1),
       side=st.integers(8, 20))
def test_every_mode_loads_to_the_right_values(mode, channels, seed, side):
    """A side x side image loaded at image_size=side (resize is the identity) equals an expectation built
    with numpy from the written pixel values: 16-bit / 257, alpha composited onto black, palette looked up,
    CMYK/YCbCr/CIELAB by their textbook formulas, grey by ITU-R 601 luma."""
    _tried("every_mode_exact")
    rng = np.random.default_rng(seed)
    blob, ext, exp, tol = _mode_case(mode, rng, side)
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/img" + ext.encode(): blob, b"b/ref.png": _solid_png((1, 2, 3))})
        kind, ds, _ = _load(root, image_size=side, channels=channels, test_fraction=0.0)
        assert kind == "ok", ds
        _check_dataset(ds, side, channels, root)
        assert ds.skipped == [], ds.skipped
        got = (ds.x_train[ds.y_train == 0][0].astype(np.float64) + 1) * 127.5
    if channels == 3:
        np.testing.assert_allclose(got, exp, atol=tol + 1e-3, err_msg=mode)
    else:
        is_grey = np.ptp(exp, axis=-1).max() == 0
        np.testing.assert_allclose(got[..., 0], _grey_levels(np.round(exp) if tol == 0 else exp),
                                   atol=(tol if is_grey else tol + 1) + 1e-3, err_msg=mode)


@fuzz(120)
@given(values=st.one_of(
    st.lists(st.floats(width=32), min_size=64, max_size=64).map(lambda v: ("F", np.array(v, np.float32))),
    st.lists(st.floats(-2.0, 2.0, width=32), min_size=64, max_size=64).map(lambda v: ("F", np.array(v, np.float32))),
    st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=64, max_size=64).map(lambda v: ("I", np.array(v, np.int32))),
    st.lists(st.integers(-300, 300), min_size=64, max_size=64).map(lambda v: ("I", np.array(v, np.int32)))),
    channels=st.sampled_from([1, 3]))
def test_float_and_int32_images_with_any_values(values, channels):
    """32-bit float / int TIFFs with any values (NaN, +-inf, subnormals, +-3e38, negative, 2**31 - 1) load
    by the documented rule, without numpy warnings (NaN pixels -> -1.0 exactly)."""
    _tried("float_int32_any_values")
    mode, v = values
    v = v.reshape(8, 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/w.tif": _encode(Image.fromarray(v, mode), "TIFF"),
                                b"b/ref.png": _solid_png((1, 2, 3))})
        kind, ds, _ = _load(root, image_size=8, channels=channels, test_fraction=0.0)
        assert kind == "ok", ds
        _check_dataset(ds, 8, channels, root)
        assert ds.skipped == []
        got = ds.x_train[ds.y_train == 0][0]
    levels = (got.astype(np.float64) + 1) * 127.5
    exp = _expected_wide_levels(v, mode)
    for c in range(channels):
        np.testing.assert_allclose(levels[..., c], exp, atol=1e-3)
    if mode == "F":
        assert (got[np.isnan(v)] == -1.0).all()


@fuzz(60)
@given(mode=st.sampled_from(["L", "RGB", "RGBA", "P"]), w=st.integers(8, 20), h=st.integers(8, 20),
       size=st.integers(8, 20), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 32 - 1))
def test_resize_matches_pillow_bilinear(mode, w, h, size, channels, seed):
    """Any w x h image equals the expected uint8 image resized by Pillow BILINEAR, / 127.5 - 1."""
    _tried("resize_matches_pillow")
    rng = np.random.default_rng(seed)
    if mode == "L":
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        im, ref = Image.fromarray(a, "L"), Image.fromarray(a, "L")
    elif mode == "RGB":
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = ref = Image.fromarray(a, "RGB")
    elif mode == "RGBA":
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8).astype(np.float64)
        im = Image.fromarray(a.astype(np.uint8), "RGBA")
        ref = Image.fromarray(np.round(a[..., :3] * a[..., 3:] / 255).astype(np.uint8), "RGB")
    else:
        pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = rng.integers(0, 256, (h, w), dtype=np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(pal.tobytes())
        ref = Image.fromarray(pal[idx], "RGB")
    ref = ref.convert("RGB").convert("L") if channels == 1 else ref.convert("RGB")
    expected = np.asarray(ref.resize((size, size), Image.BILINEAR), np.float32) / np.float32(127.5) - 1
    expected = expected.reshape(size, size, channels)
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/img.png": _encode(im, "PNG"), b"b/ref.png": _solid_png((1, 2, 3))})
        kind, ds, _ = _load(root, image_size=size, channels=channels, test_fraction=0.0)
        assert kind == "ok", ds
        _check_dataset(ds, size, channels, root)
        np.testing.assert_array_equal(ds.x_train[ds.y_train == 0][0], expected)


@fuzz(60)
@given(mode=st.sampled_from(["HSV", "La", "RGBa", "RGBX", "PA", "I;16L", "I;16B"]),
       channels=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 32 - 1))
def test_in_memory_only_modes_convert(mode, channels, seed):
    """Modes no image file yields (HSV, premultiplied La/RGBa, RGBX, ...) through the mode converter."""
    _tried("in_memory_modes")
    rng = np.random.default_rng(seed)
    s = 8
    if mode in ("I;16L", "I;16B"):
        v = rng.integers(0, 65536, (s, s), dtype=np.uint16)
        im = Image.frombytes(mode, (s, s), v.astype("<u2" if mode == "I;16L" else ">u2").tobytes())
        exp = np.repeat(np.round(v / 257.0)[..., None], 3, 2)
        tol = 0
    elif mode == "HSV":
        a = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        im = Image.fromarray(a, "HSV")
        exp = np.array([colorsys.hsv_to_rgb(*(p / 255.0)) for p in a.reshape(-1, 3).astype(np.float64)])
        exp = exp.reshape(s, s, 3) * 255
        tol = 1
    elif mode == "RGBX":
        a = rng.integers(0, 256, (s, s, 4), dtype=np.uint8)
        im = Image.fromarray(a, "RGBX")
        exp, tol = a[..., :3].astype(np.float64), 0
    elif mode == "PA":
        pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = rng.integers(0, 256, (s, s), dtype=np.uint8)
        alpha = rng.integers(0, 256, (s, s), dtype=np.uint8)
        im = Image.merge("PA", (Image.fromarray(idx, "L"), Image.fromarray(alpha, "L")))
        im.putpalette(pal.tobytes())
        exp, tol = np.round(pal[idx] * (alpha[..., None] / 255.0)), 0
    else:  # premultiplied: La / RGBa store colour * alpha / 255, i.e. already "composited onto black"
        bands = 2 if mode == "La" else 4
        a = rng.integers(0, 256, (s, s, bands), dtype=np.uint8)
        a[..., :-1] = np.minimum(a[..., :-1], a[..., -1:])  # premultiplied colour <= alpha
        im = Image.frombytes(mode, (s, s), a.tobytes())
        col = a[..., :-1].astype(np.float64)
        exp = np.repeat(col, 3, 2) if bands == 2 else col
        tol = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.asarray(data._to_rgb_or_l(im, channels), np.float64)
    assert got.shape == ((s, s, 3) if channels == 3 else (s, s))
    if channels == 3:
        np.testing.assert_allclose(got, exp, atol=tol + 1e-3, err_msg=mode)
    else:
        np.testing.assert_allclose(got, _grey_levels(exp), atol=tol + 1 + 1e-3, err_msg=mode)


@pytest.mark.parametrize("orientation", range(0, 10))
def test_exif_orientation_matches_pillow_exif_transpose(orientation):
    """EXIF orientations 1-8 (and missing/invalid ones) give what ImageOps.exif_transpose gives."""
    _tried("exif_orientation")
    rng = np.random.default_rng(orientation)
    a = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    blob = _encode(Image.fromarray(a, "RGB"), "PNG", exif=exif)
    ref = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB").resize((12, 12), Image.BILINEAR)
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/o.png": blob, b"b/ref.png": _solid_png((1, 2, 3))})
        kind, ds, _ = _load(root, image_size=12, test_fraction=0.0)
        assert kind == "ok", ds
        got = ds.x_train[ds.y_train == 0][0]
        np.testing.assert_array_equal(got, np.asarray(ref, np.float32) / np.float32(127.5) - 1)


# ------------------------------------------------------------------------ symlinks, FIFOs, devices

LINK_KINDS = ["self_loop", "pair_loop", "parent_dir", "self_dir", "root_dir", "dangling", "dangling_dir",
              "fifo", "dev_null", "dev_zero", "top_loop", "top_dangling", "top_to_root", "alias_image",
              "nested_class_link"]


@fuzz(60)
@given(kinds=st.sets(st.sampled_from(LINK_KINDS), min_size=1), channels=st.sampled_from([1, 3]))
def test_symlink_loops_fifos_and_devices(kinds, channels):
    """Looping/dangling links and non-regular files are skipped with a reason, linked folders are not
    followed (no endless walk), valid files reached through a link load; nothing hangs."""
    _tried("symlinks_fifos_devices")
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/ok.png": _solid_png((50, 60, 70)), b"b/ok.png": _solid_png((90, 80, 70)),
                                b"b/sub/deep.gif": _encode(Image.new("P", (9, 9), 3), "GIF")})
        a = os.path.join(root, "a")
        made = {"self_loop": lambda: os.symlink("x.png", os.path.join(a, "x.png")),
                "pair_loop": lambda: (os.symlink("q.png", os.path.join(a, "p.png")),
                                      os.symlink("p.png", os.path.join(a, "q.png"))),
                "parent_dir": lambda: os.symlink("..", os.path.join(a, "up")),
                "self_dir": lambda: os.symlink(".", os.path.join(root, "b", "sub", "me")),
                "root_dir": lambda: os.symlink(root, os.path.join(a, "root.png")),  # a folder named .png
                "dangling": lambda: os.symlink("/nonexistent/gone.jpg", os.path.join(a, "gone.jpg")),
                "dangling_dir": lambda: os.symlink("missing_dir", os.path.join(a, "nodir")),
                "fifo": lambda: os.mkfifo(os.path.join(a, "pipe.png")),
                "dev_null": lambda: os.symlink("/dev/null", os.path.join(a, "null.bmp")),
                "dev_zero": lambda: os.symlink("/dev/zero", os.path.join(a, "zero.tif")),
                "top_loop": lambda: os.symlink("loopcls", os.path.join(root, "loopcls")),
                "top_dangling": lambda: os.symlink("/nonexistent/dir", os.path.join(root, "ghost")),
                "top_to_root": lambda: os.symlink(".", os.path.join(root, "zroot")),
                "alias_image": lambda: os.symlink(os.path.join("..", "b", "ok.png"), os.path.join(a, "alias.png")),
                "nested_class_link": lambda: os.symlink(os.path.join("..", "b"), os.path.join(a, "blink"))}
        for k in sorted(kinds):
            made[k]()
        kind, ds, _ = _load(root, image_size=9, channels=channels, test_fraction=0.0)
        assert kind == "ok", ds
        layout = _check_dataset(ds, 9, channels, root)
        for hidden in ("loopcls", "ghost"):
            assert hidden not in ds.class_names
        candidates = [p for files in layout.values() for p in files]
        unreadable = []
        for p in candidates:
            try:
                regular = stat.S_ISREG(os.stat(p).st_mode)
            except OSError:
                regular = False
            if not regular:
                unreadable.append(p)
        assert sorted(p for p, _ in ds.skipped) == sorted(unreadable)
        assert len(ds.x_train) == len(candidates) - len(unreadable)
        if "fifo" in kinds:
            reason = dict(ds.skipped)[os.path.join(a, "pipe.png")]
            assert "not a regular file" in reason


# ---------------------------------------------------------------------------- non-UTF-8 file names

_raw_name = st.tuples(st.binary(min_size=0, max_size=8), st.integers(0x80, 0xFF), st.binary(max_size=4)).map(
    lambda t: t[0] + bytes([t[1]]) + t[2]).filter(
    lambda b: b"/" not in b and b"\0" not in b and not b.startswith(b".") and b not in (b".", b".."))


@fuzz(80)
@given(class_names=st.lists(_raw_name, min_size=2, max_size=3, unique=True), file_name=_raw_name,
       bad_name=_raw_name, root_name=st.sampled_from([b"root", b"r\xff\xfeoot", b"caf\xe9"]),
       as_bytes=st.booleans(), empty_class=st.booleans())
def test_non_utf8_file_and_folder_names(class_names, file_name, bad_name, root_name, as_bytes, empty_class):
    """Undecodable names load (class names keep their surrogate escapes); warnings and errors that name
    such paths are printable UTF-8 (escaped), for str and bytes roots alike."""
    _tried("non_utf8_names")
    assume(b"\x02empty\xff" not in class_names)
    files = {}
    for i, c in enumerate(class_names):
        files[c + b"/" + file_name + b".png"] = _solid_png((30 * i, 255 - 30 * i, 77))
    files[class_names[0] + b"/" + b"\x01" + bad_name + b".jpg"] = b"\xff\xd8\xff garbage"  # sorts first
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(_make_root(tmp, files, name=root_name))
        empty = os.path.join(root, b"\x02empty\xff") if empty_class else None
        if empty:
            os.mkdir(empty)
        kind, out, rec = _load(root if as_bytes else os.fsdecode(root), image_size=8, test_fraction=0.0)
        names = sorted(os.fsdecode(c) for c in class_names + ([os.path.basename(empty)] if empty else []))
        if empty:
            assert kind == "error" and isinstance(out, ValueError)
            msg = str(out)
            assert "no readable image" in msg and "empty\\udcff" in msg, msg
            return
        assert kind == "ok", out
        _check_dataset(out, 8, 3, root)
        assert out.class_names == names
        assert out.name == os.fsdecode(root_name)
        bad = os.fsdecode(os.path.join(root, class_names[0], b"\x01" + bad_name + b".jpg"))
        assert [p for p, _ in out.skipped] == [bad]
        assert os.path.exists(out.skipped[0][0])  # the real (surrogate-escaped) path, usable as is
        (warn,) = [w for w in rec if "skipped 1 unreadable" in str(w.message)]
        assert data._shown(bad) in str(warn.message)
        for label, c in enumerate(out.class_names):
            i = class_names.index(os.fsencode(c))
            img = (out.x_train[out.y_train == label][0] + 1) * 127.5
            np.testing.assert_allclose(img, np.broadcast_to((30 * i, 255 - 30 * i, 77), img.shape), atol=1e-3)


# ---------------------------------------------------------------------- folder structure and errors

@fuzz(150)
@given(root_kind=st.sampled_from(["dir"] * 6 + ["missing", "file"]),
       classes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.booleans()), max_size=4),
       hidden_class=st.booleans(), size=st.integers(8, 14), channels=st.sampled_from([1, 3]),
       test_fraction=st.sampled_from([0.0, 0.2, 0.5, 0.9]), seed=st.integers(0, 2 ** 32 - 1),
       max_per_class=st.none() | st.integers(1, 3))
def test_folder_structures(root_kind, classes, hidden_class, size, channels, test_fraction, seed, max_per_class):
    """Random class layouts: counts, labels, split sizes and determinism when loadable; otherwise the
    documented error (missing folder, file, < 2 classes, first class without a readable image)."""
    _tried("folder_structures")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "data")
        if root_kind == "file":
            with open(root, "wb") as f:
                f.write(_solid_png((1, 1, 1)))
        elif root_kind == "dir":
            os.mkdir(root)
            for ci, (n_ok, n_bad, extras) in enumerate(classes):
                cdir = os.path.join(root, f"c{ci}")
                os.makedirs(os.path.join(cdir, "nested"))
                for k in range(n_ok):
                    sub = "nested" if k % 2 else ""
                    with open(os.path.join(cdir, sub, f"ok{k}.png"), "wb") as f:
                        f.write(_solid_png((20 + 50 * ci,) * 3, size=(9 + k, 8)))
                for k in range(n_bad):
                    with open(os.path.join(cdir, f"bad{k}.{['gif', 'webp'][k % 2]}"), "wb") as f:
                        f.write(b"GIF89a" if k % 2 == 0 else b"RIFF\x10\x00\x00\x00WEBPVP8 ")
                if extras:
                    with open(os.path.join(cdir, "notes.txt"), "w") as f:
                        f.write("ignored")
                    with open(os.path.join(cdir, ".hidden.png"), "wb") as f:
                        f.write(b"ignored")
            if hidden_class:
                os.makedirs(os.path.join(root, ".cache"))
                with open(os.path.join(root, ".cache", "x.png"), "wb") as f:
                    f.write(_solid_png((9, 9, 9)))
        kw = dict(image_size=size, channels=channels, test_fraction=test_fraction, seed=seed,
                  max_per_class=max_per_class)
        kind, out, _ = _load(root, **kw)
        if root_kind == "missing":
            assert kind == "error" and type(out) is FileNotFoundError and "does not exist" in str(out)
            return
        if root_kind == "file":
            assert kind == "error" and type(out) is ValueError and "not a folder" in str(out)
            return
        if len(classes) < 2:
            assert kind == "error" and type(out) is ValueError and "at least 2" in str(out)
            return
        first_empty = next((ci for ci, c in enumerate(classes) if c[0] == 0), None)
        if first_empty is not None:
            assert kind == "error" and type(out) is ValueError, out
            assert f"c{first_empty}" in str(out) and "no readable image" in str(out)
            assert f"{classes[first_empty][1]} unreadable" in str(out)
            return
        assert kind == "ok", out
        _check_dataset(out, size, channels, root)
        bad = {os.path.join(root, f"c{ci}", f"bad{k}.{['gif', 'webp'][k % 2]}")
               for ci, c in enumerate(classes) for k in range(c[1])}
        assert {p for p, _ in out.skipped} <= bad
        if max_per_class is None:
            assert {p for p, _ in out.skipped} == bad
        y_all = np.concatenate([out.y_train, out.y_test])
        for ci, (n_ok, _, _) in enumerate(classes):
            n = n_ok if max_per_class is None else min(n_ok, max_per_class)
            assert (y_all == ci).sum() == n
            n_test = 0 if (n < 2 or test_fraction == 0) else min(max(int(round(n * test_fraction)), 1), n - 1)
            assert (out.y_test == ci).sum() == n_test
            for x, y in ((out.x_train, out.y_train), (out.x_test, out.y_test)):
                vals = (x[y == ci] + 1) * 127.5
                np.testing.assert_allclose(vals, 20 + 50 * ci, atol=1e-3)  # labels follow folders
        again = data.load_image_folder(root, **kw) if not out.skipped else None
        if again is not None:
            for name in ("x_train", "y_train", "x_test", "y_test"):
                np.testing.assert_array_equal(getattr(out, name), getattr(again, name))


@fuzz(40)
@given(arg=st.sampled_from(["image_size", "channels", "test_fraction", "max_per_class"]),
       data_=st.data())
def test_bad_arguments_raise_clear_value_errors(arg, data_):
    _tried("bad_arguments")
    bad = data_.draw({"image_size": st.integers(-3, 7), "channels": st.sampled_from([0, 2, 4, -1]),
                      "test_fraction": st.sampled_from([-0.1, 1.0, 1.5, float("nan"), float("inf")]),
                      "max_per_class": st.integers(-3, 0)}[arg])
    with tempfile.TemporaryDirectory() as tmp:
        root = _make_root(tmp, {b"a/x.png": _solid_png((1, 1, 1)), b"b/y.png": _solid_png((2, 2, 2))})
        kind, out, _ = _load(root, **{arg: bad})
        assert kind == "error" and type(out) is ValueError
        assert f"{arg}=" in str(out)


def test_unlistable_folder_is_a_clear_value_error(monkeypatch, tmp_path):
    """os.scandir failing (e.g. no read permission; root can't test it for real) -> ValueError."""
    _tried("unlistable_folder")
    for c in "ab":
        (tmp_path / c).mkdir()

    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(data.os, "scandir", denied)
    with pytest.raises(ValueError, match="cannot be listed.*PermissionError.*check its permissions"):
        data.load_image_folder(tmp_path)


def test_fifo_does_not_hang_the_loader(tmp_path):
    """A FIFO named like an image would block open() forever; it is skipped without being opened."""
    _tried("fifo_no_hang")
    for c in "ab":
        (tmp_path / c).mkdir()
        (tmp_path / c / "ok.png").write_bytes(_solid_png((5, 5, 5)))
    os.mkfifo(tmp_path / "a" / "pipe.jpg")
    try:
        kind, ds, _ = _load(tmp_path, image_size=8)
    except _Hang:  # SIGALRM interrupted the blocked open()
        pytest.fail("load_image_folder blocked on a FIFO")
    assert kind == "ok" and [p for p, _ in ds.skipped] == [str(tmp_path / "a" / "pipe.jpg")]
