"""Datasets: the built-in synthetic shapes, image folders (in memory or streamed), calibration subsets,
tf.data pipelines.

Every in-memory image array here is (N, H, W, C) float32 in [-1, 1] (``normalize``: x / 127.5 - 1) and every
label array is (N,) int64 class ids. ``image_folder_stream`` keeps only file names and reads images on
demand, scaled as the model expects (``PIXELS``). TensorFlow is imported only by the tf.data functions.
"""
import collections
import dataclasses
import hashlib
import itertools
import json
import math
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

SHAPE_CLASSES = ["circle", "square", "triangle", "diamond", "star",
                 "plus", "ring", "hollow_square", "ellipse", "x_cross"]


@dataclasses.dataclass
class Dataset:
    """Images (N, H, W, C) float32 in [-1, 1] and labels (N,) int64, split into train and test."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    skipped: list = dataclasses.field(default_factory=list)  # [(path, reason)] of unreadable files

    @property
    def input_shape(self):
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def classes(self):
        """Number of classes."""
        return len(self.class_names)

    def summary(self):
        """JSON-friendly description: name, train/test counts, input_shape [H, W, C], classes."""
        return {"name": str(self.name), "train": int(len(self.x_train)), "test": int(len(self.x_test)),
                "input_shape": list(self.input_shape), "classes": int(self.classes)}


def normalize(images_uint8):
    """Pixel values 0..255 (any shape, usually uint8) -> float32 in [-1, 1]: x / 127.5 - 1."""
    return np.asarray(images_uint8, np.float32) / np.float32(127.5) - np.float32(1.0)


def _derived_seed(seed, *stream):
    """A 32-bit seed for RandomState, derived from ``seed`` and a stream id (stable across numpy versions)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *stream]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Synthetic shapes
# ----------------------------------------------------------------------------------------------

def _luma(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _colours(rs, min_contrast, gradient_amp):
    """Background end colours bg1, bg2 and a foreground colour whose luma differs from both by
    >= min_contrast (0..255 units) on the same side, so the shape is visible everywhere (and in 'L')."""
    while True:
        bg1 = rs.randint(0, 256, 3)
        if rs.rand() < 0.5:
            bg2 = bg1
        else:
            bg2 = np.clip(bg1 + rs.randint(-gradient_amp, gradient_amp + 1, 3), 0, 255)
        l1, l2 = _luma(bg1.tolist()), _luma(bg2.tolist())
        for _ in range(20):
            fg = rs.randint(0, 256, 3)
            lf = _luma(fg.tolist())
            d1, d2 = lf - l1, lf - l2
            if d1 * d2 > 0 and min(abs(d1), abs(d2)) >= min_contrast:
                return bg1, bg2, fg


def _background(rs, bg1, bg2, size):
    """(size, size, 3) float32 linear gradient from bg1 to bg2 along a random direction."""
    angle = rs.uniform(0, 2 * np.pi)
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    t = np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return bg1[None, None, :] + (bg2 - bg1)[None, None, :] * t[..., None].astype(np.float32)


def _transform(points, cx, cy, radius, angle_deg):
    """Unit-circle points (K, 2) -> image coordinates: scale by radius, rotate, translate."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    p = np.asarray(points, np.float64)
    x = p[:, 0] * c - p[:, 1] * s
    y = p[:, 0] * s + p[:, 1] * c
    return [(cx + radius * xi, cy + radius * yi) for xi, yi in zip(x, y)]


def _regular(n, r=1.0, start_deg=-90.0):
    a = np.radians(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_SQUARE = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8
_TRIANGLE = _regular(3)
_DIAMOND = np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], np.float64)
_STAR = np.array([p for k in range(5) for p in (_regular(5)[k], _regular(5, 0.42, -54.0)[k])])
_ELLIPSE_T = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_BOUND = {"square": 1.14, "hollow_square": 1.14, "plus": 1.05, "x_cross": 1.05}  # in units of the radius


def _bar_cross(t):
    """A plus sign of arm half-width t, as two unit rectangles."""
    return [np.array([[-1, -t], [1, -t], [1, t], [-1, t]]), np.array([[-t, -1], [t, -1], [t, 1], [-t, 1]])]


def _hollow(img, fill, outer, inner, ellipse):
    """Paste ``fill`` through an outer-minus-inner mask, so background and clutter show in the hole."""
    mask = Image.new("L", img.size, 0)
    mdraw = ImageDraw.Draw(mask)
    (mdraw.ellipse if ellipse else mdraw.polygon)(outer, fill=255)
    (mdraw.ellipse if ellipse else mdraw.polygon)(inner, fill=0)
    img.paste(fill, (0, 0), mask)


def _draw_shape(img, rs, name, cx, cy, r, jitter, fill):
    """Draw class ``name`` of radius r (pixels of the supersampled canvas) centred at (cx, cy)."""
    draw = ImageDraw.Draw(img)
    jit = rs.uniform(-jitter, jitter)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "ring":
        w = r * rs.uniform(0.2, 0.4)
        _hollow(img, fill, [cx - r, cy - r, cx + r, cy + r],
                [cx - r + w, cy - r + w, cx + r - w, cy + r - w], ellipse=True)
    elif name == "square":
        draw.polygon(_transform(_SQUARE, cx, cy, r, jit), fill=fill)
    elif name == "hollow_square":
        w = rs.uniform(0.2, 0.4)  # fraction of the half side
        _hollow(img, fill, _transform(_SQUARE, cx, cy, r, jit),
                _transform(_SQUARE * (1 - w), cx, cy, r, jit), ellipse=False)
    elif name == "triangle":
        draw.polygon(_transform(_TRIANGLE, cx, cy, r, rs.uniform(0, 360)), fill=fill)
    elif name == "diamond":
        draw.polygon(_transform(_DIAMOND, cx, cy, r, jit), fill=fill)
    elif name == "star":
        draw.polygon(_transform(_STAR, cx, cy, r, rs.uniform(0, 360)), fill=fill)
    elif name in ("plus", "x_cross"):
        t = rs.uniform(0.18, 0.3)
        for bar in _bar_cross(t):
            draw.polygon(_transform(bar, cx, cy, r, jit + (45.0 if name == "x_cross" else 0.0)), fill=fill)
    elif name == "ellipse":
        aspect = rs.uniform(0.38, 0.6)
        pts = np.stack([np.cos(_ELLIPSE_T), aspect * np.sin(_ELLIPSE_T)], 1)
        draw.polygon(_transform(pts, cx, cy, r, jit), fill=fill)
    else:  # pragma: no cover
        raise ValueError(name)


def _knobs(d):
    """Scene parameters for difficulty d (see synthetic_shapes). Sizes are fractions of the image side."""
    return {"min_contrast": float(np.clip(75.0 - 15.0 * d, 20.0, 100.0)),  # fg/bg luma gap, 0..255 units
            "gradient_amp": int(np.clip(30 * d, 0, 120)),  # max per-channel bg1 -> bg2 change
            "clutter_mean": 1.5 * d,  # Poisson mean number of distractors (max 6)
            "clutter_top": float(np.clip(0.1 * d, 0.0, 0.4)),  # fraction of distractors drawn over the shape
            "size_lo": float(np.clip(0.7 - 0.15 * d, 0.2, 0.8)),  # shape diameter range
            "size_hi": float(np.clip(0.7 + 0.11 * d, 0.3, 0.95)),
            "jitter": float(np.clip(12.0 * d, 0.0, 20.0)),  # rotation jitter (deg), orientation-defined shapes
            "noise": 3.0 * d}  # Gaussian pixel noise std, 0..255 units (x U(0.5, 1.5) per image)


def _render(rs, label, size, scale, kn):
    """One synthetic image: (size, size, 3) uint8 RGB, drawn at size*scale and downsampled."""
    big = size * scale
    bg1, bg2, fg = _colours(rs, kn["min_contrast"], kn["gradient_amp"])
    canvas = _background(rs, bg1.astype(np.float32), bg2.astype(np.float32), size)  # smooth: upsample
    img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((big, big), Image.NEAREST)  # cheap; the gradient is smooth at the output size
    draw = ImageDraw.Draw(img)

    clutter = []  # (on_top, kind, xy, colour, width)
    for _ in range(min(int(rs.poisson(kn["clutter_mean"])), 6)):
        kind = rs.randint(3)
        colour = tuple(int(v) for v in rs.randint(0, 256, 3))
        x, y = rs.uniform(0, big, 2)
        on_top = bool(rs.rand() < kn["clutter_top"])
        if kind == 0:  # blob
            rx, ry = rs.uniform(0.03, 0.07, 2) * big
            clutter.append((on_top, "ellipse", [x - rx, y - ry, x + rx, y + ry], colour, None))
        elif kind == 1:  # line
            length, ang = rs.uniform(0.12, 0.35) * big, rs.uniform(0, 2 * np.pi)
            width = max(1, int(round(rs.uniform(0.6, 1.6) * scale)))
            clutter.append((on_top, "line", [x, y, x + length * np.cos(ang), y + length * np.sin(ang)],
                            colour, width))
        else:  # speck
            rx = rs.uniform(0.015, 0.04) * big
            clutter.append((on_top, "ellipse", [x - rx, y - rx, x + rx, y + rx], colour, None))

    def draw_clutter(top):
        for on_top, kind, xy, colour, width in clutter:
            if on_top == top:
                if kind == "line":
                    draw.line(xy, fill=colour, width=width)
                else:
                    draw.ellipse(xy, fill=colour)

    draw_clutter(False)
    name = SHAPE_CLASSES[label]
    r = rs.uniform(kn["size_lo"], kn["size_hi"]) * big / 2.0
    margin = min(r * _BOUND.get(name, 1.0), big / 2.0)
    cx, cy = rs.uniform(margin, big - margin, 2)
    _draw_shape(img, rs, name, cx, cy, r, jitter=kn["jitter"], fill=tuple(int(v) for v in fg))
    draw_clutter(True)
    return np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8)


def _make_split(n, size, channels, seed, difficulty, noise):
    rs = np.random.RandomState(_derived_seed(seed, 0))  # scene geometry and colours
    rs_noise = np.random.RandomState(_derived_seed(seed, 1))  # pixel noise (same scenes for channels 1 and 3)
    rs_label = np.random.RandomState(_derived_seed(seed, 2))
    k = len(SHAPE_CLASSES)
    labels = np.concatenate([np.zeros(0, np.int64)] + [rs_label.permutation(k) for _ in range(-(-n // k))])
    labels = labels[:n].astype(np.int64)
    kn = _knobs(difficulty)
    noise = kn["noise"] if noise is None else float(noise)
    scale = 4 if size <= 64 else (2 if size <= 160 else 1)
    x = np.empty((n, size, size, channels), np.float32)
    for i in range(n):
        rgb = _render(rs, int(labels[i]), size, scale, kn)
        if channels == 1:
            pix = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), np.float32)[..., None]
        else:
            pix = rgb.astype(np.float32)
        sigma = noise * rs_noise.uniform(0.5, 1.5)
        pix = pix + rs_noise.normal(0.0, 1.0, pix.shape).astype(np.float32) * np.float32(sigma)
        x[i] = np.clip(np.round(pix), 0, 255)
    x /= np.float32(127.5)  # normalize() in place: x / 127.5 - 1
    x -= np.float32(1.0)
    return x, labels


def synthetic_shapes(n_train=10000, n_test=1000, image_size=32, channels=3, seed=0, noise=None,
                     difficulty=1.3):
    """The built-in dataset: 10 classes of shapes drawn with Pillow, no download, fully deterministic.

    Classes (``SHAPE_CLASSES``): circle, square, triangle, diamond, star, plus, ring, hollow_square,
    ellipse (horizontal), x_cross -- told apart by shape, never by colour. Each image: a random solid or
    gradient background, a random foreground colour with a minimum luma contrast (so channels=1 works
    too), random size and position, random rotation (any angle for triangle/star; a small jitter for
    square, diamond, plus, ellipse and x_cross, which are defined by their orientation), random line
    widths for ring/hollow_square, small distractor blobs/lines/specks (a few over the shape) and
    Gaussian pixel noise. Drawn at 4x resolution (2x above 64 px, 1x above 160 px), downsampled BILINEAR.

    n_train, n_test: image counts (0 allowed). image_size: H = W in pixels (>= 8). channels: 3 (RGB)
    or 1 (grayscale 'L' of the same scenes). seed: train and test are drawn from two seeds derived from
    it, so they never share images; the first k images of a split do not depend on n_train/n_test.
    noise: std of the Gaussian pixel noise in 0..255 units, scaled per image by U(0.5, 1.5);
    None -> 3 * difficulty.
    difficulty (>= 0, default 1.3) scales all nuisances together (see ``_knobs``): shape diameter
    U(0.7 - 0.15d, 0.7 + 0.11d) of the image side (55%..81% at 1, 40%..92% at 2), distractor count
    Poisson(1.5d) with 10%*d of them over the shape, rotation jitter 12d deg (max 20), background
    gradient up to 30d per channel, minimum fg/bg luma contrast 75 - 15d, noise 3d. 0 = clean shapes.
    1.0 is tuned so a 3-conv (16/32/64) BN+ReLU CNN trained 8 epochs on 4000 images reaches ~91-96%
    test accuracy with BN momentum 0.9 (~80-86% with Keras' default 0.99, whose moving averages lag
    after so few steps; ~97% after 20 epochs); 0.5 gives ~94-98%, 2.0 ~50-70% after 8 epochs.
    The default 1.3 puts the demo (MobileNetV2-0.35, 10,000 images, 10 epochs) at ~98.5% float
    accuracy (1.0: 99.1%, above the 85-99% band the demo targets).
    Returns Dataset "synthetic_shapes": x (N, image_size, image_size, channels) float32 in [-1, 1],
    y (N,) int64; classes are balanced (each block of 10 consecutive images holds every class once).
    """
    if channels not in (1, 3):
        raise ValueError(f"synthetic_shapes: channels={channels!r}; use 3 (RGB) or 1 (grayscale).")
    if int(image_size) < 8:
        raise ValueError(f"synthetic_shapes: image_size={image_size!r} is too small; use image_size >= 8.")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"synthetic_shapes: n_train={n_train}, n_test={n_test}; counts must be >= 0.")
    if difficulty < 0:
        raise ValueError(f"synthetic_shapes: difficulty={difficulty!r}; use a value >= 0 (1.0 is the default).")
    size = int(image_size)
    x_tr, y_tr = _make_split(int(n_train), size, channels, _derived_seed(seed, 100), float(difficulty), noise)
    x_te, y_te = _make_split(int(n_test), size, channels, _derived_seed(seed, 200), float(difficulty), noise)
    return Dataset("synthetic_shapes", x_tr, y_tr, x_te, y_te, list(SHAPE_CLASSES))


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

_FOLDER_FIX = "lay it out as {path}/<class name>/<image>.png|jpg|... (one sub-folder per class)"

# Images above this many pixels are box-reduced in their own mode (to >= 2x the target size) before the
# mode conversion, whose numpy temporaries would otherwise cost ~16-48 bytes per source pixel.
_SHRINK_ABOVE_PIXELS = 1 << 22

_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _shown(text):
    """``text`` safe to print or encode as UTF-8: undecodable file-name bytes (surrogate escapes) and
    other unencodable characters become backslash escapes."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_class_dir(entry):
    """A non-hidden sub-folder (symlinks followed); broken or looping symlinks are not class folders."""
    if entry.name.startswith("."):
        return False
    try:
        return entry.is_dir()
    except OSError:  # ELOOP (a symlink to itself), EACCES, ...: not a usable class folder
        return False


def _class_files(class_dir):
    """Image files under class_dir (recursive, hidden entries skipped, symlinked folders not followed,
    so a link to a parent cannot loop), sorted."""
    found = []
    for root, dirs, names in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, n) for n in names
                     if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def _to_rgb_or_l(im, channels, top=None):
    """Any Pillow mode -> 'RGB' (channels=3) or 'L' (channels=1), uint8.

    16-bit ('I;16*') is scaled by 1/257; 'I'/'F' are taken as 8-bit values when their max is <= 255,
    as 16-bit (1/257) above, and 'F' with max <= 1 as [0, 1] floats ('F' NaN -> 0, +inf -> the largest
    finite value, -inf -> 0). ``top``: that max (largest finite value) when ``im`` is a reduced copy.
    Transparent images (RGBA, LA, PA, P or L/RGB with a transparency key) are composited onto black;
    premultiplied ones (RGBa, La) already are."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, np.float64)
        finite = np.isfinite(a)
        if top is None:
            top = float(a[finite].max()) if finite.any() else 0.0
        if not finite.all():
            a = np.where(np.isnan(a), 0.0, np.minimum(a, top))
        if mode.startswith("I;16") or top > 255.0:
            a = a / 257.0
        elif mode == "F" and top <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBa", "La"):  # premultiplied alpha: the colour bands already are "composited onto black"
        im = im.getchannel(0) if mode == "La" else Image.merge("RGB", im.split()[:3])
    elif mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / np.float32(255.0))
        im = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im.convert("L") if channels == 1 else im


def _shrink(im, image_size):
    """A big image box-reduced by integer factors so each side stays >= 2 * image_size (or as is).
    ``image_size``: the larger side of the target (so either orientation keeps >= 2x in both sides).

    Palette, bilevel and colour-keyed images are converted first (averaging palette indices or a
    colour key is meaningless); 16-bit images, which ``Image.reduce`` lacks, are BOX-resized."""
    w, h = im.size
    fx, fy = max(1, w // (2 * image_size)), max(1, h // (2 * image_size))
    if w * h <= _SHRINK_ABOVE_PIXELS or fx * fy == 1:
        return im
    if im.mode == "1":
        im = im.convert("L")
    elif im.mode in ("P", "PA"):
        im = im.convert("RGBA" if (im.mode == "PA" or "transparency" in im.info) else "RGB")
    elif im.mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode.startswith("I;16"):
        return im.resize((-(-w // fx), -(-h // fy)), Image.BOX)
    return im.reduce((fx, fy))


def _finite_max(im):
    """Largest finite pixel value of an 'I' or 'F' image (0.0 if none), scanned in strips of <= 512 K
    pixels so a big image costs no big numpy temporaries (Pillow's getextrema is NaN-blind)."""
    if im.mode != "F":
        return float(im.getextrema()[1])
    w, h = im.size
    step, top = max(1, (1 << 19) // max(w, 1)), None
    for y in range(0, h, step):
        a = np.asarray(im.crop((0, y, w, min(h, y + step))))
        a = a[np.isfinite(a)]
        if a.size:
            top = float(a.max()) if top is None else max(top, float(a.max()))
    return 0.0 if top is None else top


def _orientation(im):
    """The EXIF (or XMP) orientation's transpose method, or None (also for a broken EXIF block)."""
    try:
        return _ORIENTATION.get(int(im.getexif().get(0x0112, 1)))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image
        return None


def _hw(image_size):
    """image_size (int, or (height, width)) -> (height, width) ints."""
    if isinstance(image_size, (tuple, list)):
        h, w = image_size
        return int(h), int(w)
    return int(image_size), int(image_size)


def _read_image(path, image_size, channels):
    """One file -> (H, W, channels) uint8, image_size = H = W (int) or (H, W); raises whatever Pillow raises.

    Only regular files are opened (a FIFO would block forever, a device never end). An image over
    ``Image.MAX_IMAGE_PIXELS`` is refused before decoding: Pillow only warns (DecompressionBombWarning)
    between that limit and twice it, and that warning is raised here as an error."""
    h, w = _hw(image_size)
    side = max(h, w)  # JPEG draft and big-image reduction keep >= 2x the larger side, whatever the EXIF rotation
    st = os.stat(path)  # follows symlinks: a dangling or looping link raises OSError here
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file (a FIFO, device or socket named like an image); "
                         "only regular image files are read")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        if im.format == "JPEG":  # decode big JPEGs at a reduced scale (still >= 2x the target size)
            im.draft(None, (2 * side, 2 * side))
        im.load()
        method = _orientation(im)
        small = _shrink(im, side)
        # the 8-/16-bit/[0, 1] choice for 'I'/'F' follows the full-resolution maximum, not the averaged one
        top = _finite_max(im) if (small is not im and im.mode in ("I", "F")) else None
        im = small if method is None else small.transpose(method)
        im = _to_rgb_or_l(im, channels, top).resize((w, h), Image.BILINEAR)
        a = np.asarray(im, np.uint8)
    return a[..., None] if channels == 1 else a


def _ordered_map(fn, items, workers):
    """Yield (item, fn(item), None) or (item, None, exception) in the order of ``items``. workers <= 1:
    one after the other in this thread; otherwise a thread pool with at most 2 * workers calls in flight
    (Pillow releases the GIL while it decodes and resizes), so results never pile up. Stopping the
    iteration early waits for the calls in flight and starts no other."""
    if workers <= 1:
        for item in items:
            try:
                result = fn(item)
            except Exception as e:  # noqa: BLE001 - the caller decides what a failure means
                yield item, None, e
            else:
                yield item, result, None
        return
    from concurrent.futures import ThreadPoolExecutor
    items = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="mobileqat-decode") as pool:
        pending = collections.deque((item, pool.submit(fn, item)) for item in itertools.islice(items, 2 * workers))
        try:
            while pending:
                item, future = pending.popleft()
                error = future.exception()
                yield item, (None if error is not None else future.result()), error
                for nxt in itertools.islice(items, 1):
                    pending.append((nxt, pool.submit(fn, nxt)))
        finally:
            for _, future in pending:
                future.cancel()


def _default_workers():
    return max(1, min(8, os.cpu_count() or 1))


def _check_folder_args(fn, path, image_size, channels, test_fraction, max_per_class):
    """The checks load_image_folder and image_folder_stream share. Returns (folder, fix, class_names)."""
    folder = os.path.abspath(os.path.expanduser(os.fsdecode(path)))  # bytes paths too
    fix = _FOLDER_FIX.format(path=_shown(folder))
    if not os.path.exists(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist; pass an existing folder and {fix}.")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is a file, not a folder; pass the folder that holds the class "
                         f"sub-folders ({fix}).")
    if min(_hw(image_size)) < 8:
        raise ValueError(f"{fn}({folder!r}): image_size={image_size!r} is too small; use image_size >= 8.")
    if channels not in (1, 3):
        raise ValueError(f"{fn}({folder!r}): channels={channels!r}; use 3 (RGB) or 1 (grayscale).")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"{fn}({folder!r}): test_fraction={test_fraction!r}; use a value in [0, 1).")
    if max_per_class is not None and int(max_per_class) < 1:
        raise ValueError(f"{fn}({folder!r}): max_per_class={max_per_class!r}; use None or >= 1.")
    try:
        with os.scandir(folder) as entries:
            class_names = sorted(e.name for e in entries if _is_class_dir(e))
    except OSError as e:
        raise ValueError(f"image folder {folder!r} cannot be listed ({type(e).__name__}: {_shown(e)}); "
                         f"check its permissions and {fix}.") from e
    if len(class_names) < 2:
        raise ValueError(f"image folder {folder!r} has {len(class_names)} class sub-folder(s) "
                         f"{class_names}; at least 2 are needed: {fix}.")
    return folder, fix, class_names


def _pick_images(fn, folder, class_names, seed, max_per_class, read, workers):
    """Per class, the readable files in a seeded order (at most max_per_class), each with ``read(path)``.

    Returns ([[(path, read result), ...] per class], skipped [(path, reason)], sorted). Raises the
    "no readable image" ValueError at the first class without one (after warning about the skips)."""
    skipped, per_class = [], []
    for ci, name in enumerate(class_names):
        class_dir = os.path.join(folder, name)
        files = _class_files(class_dir)
        order = np.random.RandomState(_derived_seed(seed, 10, ci)).permutation(len(files))
        picked, bad = [], 0
        results = _ordered_map(read, (files[j] for j in order), workers)
        try:
            for path, result, error in results:
                if error is not None:  # any decoder failure means "unreadable"
                    skipped.append((path, f"{type(error).__name__}: {_shown(error)}"))
                    bad += 1
                else:
                    picked.append((path, result))
                if max_per_class is not None and len(picked) >= int(max_per_class):
                    break
        finally:
            results.close()
        if not picked:
            if skipped:
                _warn_skipped(fn, folder, skipped)
            raise ValueError(f"class folder {class_dir!r} has no readable image ({len(files)} file(s) with an "
                             f"image extension, {bad} unreadable); add {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}"
                             " images to it or remove the folder.")
        per_class.append(picked)
    if skipped:
        skipped.sort()
        _warn_skipped(fn, folder, skipped)
    return per_class, skipped


def _split(counts, test_fraction, seed):
    """The seeded stratified split of load_image_folder: per class, round(n * test_fraction) test items
    (at least 1 and at most n - 1 when n >= 2), then both splits shuffled. ``counts``: items per class.
    Returns (train, test): int64 arrays of (class, index within the class) rows, in the final order."""
    tr, te = [], []
    for ci, n in enumerate(counts):
        n_test = 0 if (n < 2 or test_fraction == 0) else min(max(int(round(n * test_fraction)), 1), n - 1)
        perm = np.random.RandomState(_derived_seed(seed, 20, ci)).permutation(n)
        te.extend((ci, int(j)) for j in perm[:n_test])
        tr.extend((ci, int(j)) for j in perm[n_test:])
    rs = np.random.RandomState(_derived_seed(seed, 30))
    tr, te = np.array(tr, np.int64).reshape(-1, 2), np.array(te, np.int64).reshape(-1, 2)
    p_tr, p_te = rs.permutation(len(tr)), rs.permutation(len(te))
    return tr[p_tr], te[p_te]


def load_image_folder(path, image_size=32, channels=3, test_fraction=0.2, seed=0, max_per_class=None):
    """A folder with one sub-folder per class -> Dataset (images resized to image_size x image_size).

    Class names are the sorted sub-folder names (hidden entries and top-level files are ignored); each
    class folder is searched recursively for png/jpg/jpeg/bmp/gif/webp/tif/tiff files (any case). Any
    Pillow mode is converted to RGB (channels=3) or L (channels=1) (transparency composited onto
    black, 16-bit scaled to 8-bit), EXIF rotation applied, resized with BILINEAR (aspect ratio not kept)
    and normalized to [-1, 1]. Files Pillow cannot open or decode go to ``Dataset.skipped`` as
    (path, reason) with one warning, and so do dangling or looping symlinks, FIFOs/devices named like
    images (never opened) and images over ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bombs, refused
    before decoding). Images above 4 Mpx are box-reduced in their own mode (to >= 2x image_size) before
    the conversion, so memory stays bounded. Symlinked folders inside a class folder are not followed.
    ``path`` may be str, bytes or path-like; undecodable file names keep their surrogate escapes in
    class_names/skipped and are shown backslash-escaped in messages. Split: per class, a seeded stratified split with
    round(n * test_fraction) test images (at least 1 and at most n - 1 when the class has >= 2 images),
    identical on every call for the same seed. max_per_class caps the images per class (a seeded,
    deterministic choice). Both splits are shuffled. Name: the folder's basename.
    """
    folder, _, class_names = _check_folder_args("load_image_folder", path, image_size, channels, test_fraction,
                                                max_per_class)
    size = int(image_size)
    per_class, skipped = _pick_images("load_image_folder", folder, class_names, seed, max_per_class,
                                      lambda p: _read_image(p, size, channels), workers=1)
    tr, te = _split([len(c) for c in per_class], test_fraction, seed)
    empty = np.zeros((0, size, size, channels), np.uint8)

    def gather(rows):
        return np.stack([per_class[ci][j][1] for ci, j in rows]) if len(rows) else empty

    return Dataset(_folder_name(folder), normalize(gather(tr)), tr[:, 0].copy(),
                   normalize(gather(te)), te[:, 0].copy(), class_names, skipped)


def _folder_name(folder):
    return os.path.basename(folder.rstrip(os.sep)) or folder


def _warn_skipped(fn, folder, skipped):
    path, reason = skipped[0]
    warnings.warn(f"{fn}({folder!r}): skipped {len(skipped)} unreadable file(s), first: "
                  f"{_shown(path)} ({_shown(reason)}); delete or re-save them to silence this.", stacklevel=4)


# ----------------------------------------------------------------------------------------------
# Image folders, streamed
# ----------------------------------------------------------------------------------------------

PIXELS = ("-1..1", "0..1", "0..255", "mean_std")
AUGMENTATIONS = ("flip", "crop", "brightness")


def _pixel_stats(fn, pixels, mean, std, channels):
    """Check the pixel scaling; returns (mean, std) as float32 arrays of ``channels`` values, or Nones."""
    if pixels not in PIXELS:
        raise ValueError(f"{fn}: pixels={pixels!r}; use one of {', '.join(PIXELS)} (the scaling the model "
                         "expects: x/127.5 - 1, x/255, x, or (x - mean) / std per channel, x in 0..255).")
    if pixels != "mean_std":
        if mean is not None or std is not None:
            raise ValueError(f"{fn}: mean/std are given but pixels={pixels!r}; pass pixels='mean_std' with them, "
                             "or drop them.")
        return None, None
    if mean is None or std is None:
        raise ValueError(f"{fn}: pixels='mean_std' needs mean and std, one value per channel in 0..255 pixel "
                         "units (ImageNet: mean 123.675 116.28 103.53, std 58.395 57.12 57.375).")
    out = []
    for what, v in (("mean", mean), ("std", std)):
        a = np.atleast_1d(np.asarray(v, np.float64)).ravel()
        if len(a) == 1:
            a = np.repeat(a, channels)
        if len(a) != channels or not np.all(np.isfinite(a)):
            raise ValueError(f"{fn}: {what}={a.tolist()!r}; give {channels} finite value(s), one per "
                             f"channel (or one for all).")
        out.append(a.astype(np.float32))
    given = {k: np.atleast_1d(np.asarray(v, np.float64)).tolist() for k, v in (("mean", mean), ("std", std))}
    if np.any(out[1] <= 0):
        raise ValueError(f"{fn}: std={given['std']} has a value <= 0; every std must be > 0.")
    if np.all(out[1] <= 1.0) and np.all(np.abs(out[0]) <= 1.0):
        raise ValueError(f"{fn}: mean={given['mean']}, std={given['std']} look like 0..1 units; mean and std are in "
                         "0..255 pixel units ((x - mean) / std, x in 0..255): multiply them by 255 "
                         "(e.g. std 0.229 -> 58.395).")
    return out[0], out[1]


def scale_pixels(x, pixels="-1..1", mean=None, std=None):
    """uint8 (or 0..255 float) pixels -> float32 as the model expects: "-1..1" x/127.5 - 1 (``normalize``),
    "0..1" x/255, "0..255" x, "mean_std" (x - mean) / std (mean, std per channel, 0..255 units). The tf.data
    pipeline computes the very same float32 operations, so both give identical bits."""
    x = np.asarray(x, np.float32)
    if pixels == "-1..1":
        return x / np.float32(127.5) - np.float32(1.0)
    if pixels == "0..1":
        return x / np.float32(255.0)
    if pixels == "0..255":
        return x
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _augmentations(augment):
    """augment: None/False (none), True (all), or names from AUGMENTATIONS -> tuple of names."""
    if augment is None or augment is False:
        return ()
    if augment is True:
        return AUGMENTATIONS
    names = (augment,) if isinstance(augment, str) else tuple(augment)
    bad = [a for a in names if a not in AUGMENTATIONS]
    if bad:
        raise ValueError(f"augment={augment!r}: unknown {bad}; use True or names from {AUGMENTATIONS}.")
    return tuple(a for a in AUGMENTATIONS if a in names)


@dataclasses.dataclass
class ImageFolderStream:
    """An image folder listed, checked and split, its pixels read on demand (``image_folder_stream``).

    ``train_files``/``test_files`` are in the order ``load_image_folder`` puts ``x_train``/``x_test`` with
    the same arguments; labels ``y_train``/``y_test`` (N,) int64. Pixels come out as float32 scaled as
    ``pixels`` says (see ``scale_pixels``): numpy arrays from ``arrays``/``chunks``/``calibration``, a
    tf.data pipeline from ``dataset``. Memory holds the file list, never the images."""
    name: str
    folder: str
    class_names: list
    train_files: list
    y_train: np.ndarray
    test_files: list
    y_test: np.ndarray
    image_size: tuple  # (H, W)
    channels: int
    pixels: str = "-1..1"
    mean: object = None  # float32 (C,) for pixels="mean_std"
    std: object = None
    skipped: list = dataclasses.field(default_factory=list)
    workers: int = dataclasses.field(default_factory=_default_workers)
    stats: dict = dataclasses.field(default_factory=dict, repr=False)  # path -> (size, mtime_ns) when listed

    @property
    def input_shape(self):
        """(H, W, C) of one image."""
        return (int(self.image_size[0]), int(self.image_size[1]), int(self.channels))

    @property
    def classes(self):
        return len(self.class_names)

    def summary(self):
        """JSON-friendly: name, train/test counts, input_shape, classes, pixels, skipped (count), streamed."""
        return {"name": str(self.name), "train": len(self.train_files), "test": len(self.test_files),
                "input_shape": list(self.input_shape), "classes": int(self.classes), "pixels": self.pixels,
                **({"mean": self.mean.tolist(), "std": self.std.tolist()} if self.pixels == "mean_std" else {}),
                "skipped": len(self.skipped), "streamed": True}

    def _split_of(self, split):
        if split == "train":
            return self.train_files, self.y_train
        if split == "test":
            return self.test_files, self.y_test
        raise ValueError(f"split={split!r}; use 'train' or 'test'.")

    def read(self, path):
        """One file -> (H, W, C) uint8, by the hardened Pillow reader of load_image_folder."""
        try:
            return _read_image(path, self.image_size, self.channels)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"image {_shown(path)} could be read when the folder {_shown(self.folder)} was listed "
                             f"and cannot now ({type(e).__name__}: {_shown(e)}); restore it, or list the folder "
                             "again (a new run) to skip it.") from e

    def scale(self, x):
        """uint8 pixels -> float32 scaled as ``pixels`` says."""
        return scale_pixels(x, self.pixels, self.mean, self.std)

    def _decode(self, files):
        h, w, c = self.input_shape
        out = np.empty((len(files), h, w, c), np.uint8)
        for i, (_, img, error) in enumerate(_ordered_map(self.read, files, self.workers)):
            if error is not None:
                raise error
            out[i] = img
        return out

    def arrays(self, split="test", start=0, stop=None):
        """Images [start:stop] of a split, decoded now (no augmentation): (x float32 (N, H, W, C), y (N,))."""
        files, y = self._split_of(split)
        return self.scale(self._decode(files[start:stop])), np.asarray(y[start:stop], np.int64)

    def chunks(self, split="test", max_images=512):
        """Yield (x, y) numpy chunks of at most ``max_images`` covering the split in order."""
        n = len(self._split_of(split)[0])
        for start in range(0, n, max(1, int(max_images))):
            yield self.arrays(split, start, start + int(max_images))

    def calibration(self, n=256, seed=0):
        """The images ``calibration_subset`` takes from load_image_folder's x_train (same files, same order)."""
        idx = calibration_indices(self.y_train, n, seed, self.name)
        return self.scale(self._decode([self.train_files[i] for i in idx]))

    def fingerprint(self):
        """blake2b (hex) of the class names, the size/channels/pixel scaling and, per split, every file's path
        (relative to the folder), label, size and modification time as listed."""
        h = hashlib.blake2b(digest_size=16)
        head = {"classes": [_shown(c) for c in self.class_names], "input_shape": list(self.input_shape),
                "pixels": self.pixels, "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}
        h.update(json.dumps(head, sort_keys=True).encode())
        for split in ("train", "test"):
            files, y = self._split_of(split)
            h.update(f"\n{split} {len(files)}\n".encode())
            for path, label in zip(files, y):
                size, mtime = self.stats.get(path) or _stat(path)
                rel = os.fsencode(os.path.relpath(path, self.folder))
                h.update(rel + f"\0{int(label)}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def dataset(self, split="train", batch_size=64, shuffle=None, augment=None, seed=0, cache=None,
                shuffle_buffer=1024, drop_remainder=False):
        """A tf.data pipeline of (x float32 (B, H, W, C), y int64 (B,)) batches over one split.

        Files are decoded in parallel (``num_parallel_calls=AUTOTUNE``; Pillow through ``tf.numpy_function``,
        the same reader as load_image_folder), in order (deterministic). shuffle (default: True for "train"):
        the file order, seeded, reshuffled every epoch. augment (training only): True or names from
        ``AUGMENTATIONS`` -- "flip" (left-right, p 0.5), "crop" (a random window of 87.5-100 % of each side,
        resized back bilinearly), "brightness" (+-10 % of full scale, clipped) -- seeded per element and per
        epoch, applied to 0..255 pixels before the scaling. cache: a file name prefix; the decoded uint8
        images are written there during the first epoch and read back afterwards (then the shuffle is a
        buffer of ``shuffle_buffer`` decoded images after the cache; a run killed while writing it leaves
        ``<prefix>_*.lockfile``, which must be deleted before the next). Then batched, scaled (one op per
        batch), prefetched.
        """
        from mobileqat._tf import tf
        files, y = self._split_of(split)
        shuffle = (split == "train") if shuffle is None else bool(shuffle)
        aug = _augmentations(augment)
        if aug and split != "train":
            raise ValueError(f"augment={augment!r} for split {split!r}: augmentation is for training only; "
                             "evaluate on un-augmented images.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}; use >= 1.")
        h, w, c = self.input_shape
        files = list(files)
        n = len(files)

        def load(i):
            return self.read(files[int(i)])

        def decode(i, label):
            img = tf.numpy_function(load, [i], tf.uint8, stateful=False)
            img.set_shape((h, w, c))
            return img, label

        ds = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), np.asarray(y, np.int64)))
        if shuffle and not cache:
            ds = ds.shuffle(max(1, n), seed=_derived_seed(seed, 60), reshuffle_each_iteration=True)
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        if cache:
            ds = ds.cache(os.fspath(cache))
            if shuffle:
                ds = ds.shuffle(max(1, min(n, int(shuffle_buffer))), seed=_derived_seed(seed, 60),
                                reshuffle_each_iteration=True)
        if aug:
            rand = tf.data.Dataset.random(seed=_derived_seed(seed, 61), rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip((ds, rand)).map(
                lambda xy, r: (_augment_tf(tf, xy[0], r, aug, (h, w, c)), xy[1]), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)  # uint8 (float after augmentation)
        ds = ds.map(lambda img, label: (self._scale_tf(tf, img), label), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _scale_tf(self, tf, img):
        x = tf.cast(img, tf.float32)
        if self.pixels == "-1..1":
            return x / 127.5 - 1.0
        if self.pixels == "0..1":
            return x / 255.0
        if self.pixels == "0..255":
            return x
        return (x - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)


def _augment_tf(tf, img, r, aug, shape):
    """Seeded (stateless) augmentation of one uint8 image -> float32 in 0..255; ``r`` an int64 per element."""
    h, w, c = shape
    x = tf.cast(img, tf.float32)

    def seed(k):
        return tf.stack([r, tf.constant(k, tf.int64)])
    if "flip" in aug:
        x = tf.image.stateless_random_flip_left_right(x, seed(1))
    if "crop" in aug:
        u = tf.random.stateless_uniform([3], seed(2))
        side = 0.875 + 0.125 * u[0]
        y1, x1 = (1.0 - side) * u[1], (1.0 - side) * u[2]
        box = tf.stack([y1, x1, y1 + side, x1 + side])[None]
        x = tf.image.crop_and_resize(x[None], box, [0], (h, w))[0]
    if "brightness" in aug:
        x = tf.clip_by_value(tf.image.stateless_random_brightness(x, 0.1 * 255.0, seed(3)), 0.0, 255.0)
    return x


def _stat(path):
    try:
        st = os.stat(path)
        return int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return -1, -1


def image_folder_stream(path, image_size=32, channels=3, test_fraction=0.2, seed=0, max_per_class=None,
                        pixels="-1..1", mean=None, std=None, workers=None):
    """A folder with one sub-folder per class -> ImageFolderStream: file lists and labels, images read on
    demand, so memory stays bounded whatever the folder size.

    Same classes, files, skips, refusals and split as ``load_image_folder`` with the same arguments (its
    docstring has the rules): every file is decoded once now, in ``workers`` threads (default: up to 8, one
    per core), by the same hardened Pillow reader, and the decoded pixels are dropped; files it cannot read
    go to ``skipped`` with one warning, exactly as there, so both give the same train/test files in the same
    order, and ``calibration_subset`` the same calibration images. image_size: int (square) or (H, W).
    pixels: the scaling the model expects, one of ``PIXELS`` (see ``scale_pixels``); mean/std for
    "mean_std", per channel in 0..255 units. Pillow (via ``tf.numpy_function``) rather than
    ``tf.io.decode_image``: TensorFlow's decoders read no TIFF, no 16-bit or float modes, apply no EXIF
    rotation, drop alpha instead of compositing it, and allocate whatever size a header claims
    (decompression bombs), so they would neither keep the hardened loader's guarantees nor give the same
    pixels. Pillow releases the GIL while it decodes and resizes, so the parallel map runs in parallel.
    """
    fn = "image_folder_stream"
    folder, _, class_names = _check_folder_args(fn, path, image_size, channels, test_fraction, max_per_class)
    p_mean, p_std = _pixel_stats(fn, pixels, mean, std, channels)
    hw = _hw(image_size)
    workers = _default_workers() if workers is None else max(1, int(workers))
    stats = {}

    def check(p):
        _read_image(p, hw, channels)  # decoded and dropped: readable, in the loader's sense
        stats[p] = _stat(p)
        return p

    per_class, skipped = _pick_images(fn, folder, class_names, seed, max_per_class, check, workers)
    tr, te = _split([len(c) for c in per_class], test_fraction, seed)
    return ImageFolderStream(_folder_name(folder), folder, class_names,
                             [per_class[ci][j][0] for ci, j in tr], tr[:, 0].copy(),
                             [per_class[ci][j][0] for ci, j in te], te[:, 0].copy(),
                             hw, int(channels), pixels, p_mean, p_std, skipped, workers, stats)


# ----------------------------------------------------------------------------------------------
# Calibration and tf.data
# ----------------------------------------------------------------------------------------------

def calibration_subset(dataset, n=256, seed=0):
    """n images (n, H, W, C) float32 from dataset.x_train, stratified: classes taken round-robin in a
    seeded random order within each class, so per-class counts differ by at most one where possible.
    Deterministic for a given seed; returns all training images (reordered) when n >= len(x_train).
    ``dataset``: a Dataset, or an ImageFolderStream (the same images its in-memory twin would give)."""
    if isinstance(dataset, ImageFolderStream):
        return dataset.calibration(n, seed)
    idx = calibration_indices(dataset.y_train, n, seed, dataset.name)
    return np.array(dataset.x_train[idx], np.float32)


def calibration_indices(y_train, n=256, seed=0, name="dataset"):
    """The indices into the training split that ``calibration_subset`` takes (see there)."""
    y = np.asarray(y_train)
    if len(y) == 0:
        raise ValueError(f"dataset {name!r} has no training images to calibrate on; build it with "
                         "n_train > 0 (synthetic_shapes) or test_fraction < 1 (load_image_folder).")
    if int(n) < 1:
        raise ValueError(f"calibration_subset: n={n!r}; use n >= 1 (256 is typical).")
    rs = np.random.RandomState(_derived_seed(seed, 40))
    perm = rs.permutation(len(y))  # random order; a stable sort by (rank within class, class) interleaves
    labels = y[perm]
    rank = np.empty(len(y), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return perm[np.lexsort((labels, rank))][: int(n)]


def as_tf_dataset(x, y, batch_size=64, shuffle=False, seed=0):
    """(x, y) numpy arrays -> tf.data.Dataset of (x, y) batches, optionally shuffled (seeded, reshuffled
    every epoch), prefetched. y=None gives batches of x only."""
    from mobileqat._tf import tf
    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    if shuffle:
        ds = ds.shuffle(max(1, len(x)), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(int(batch_size)).prefetch(tf.data.AUTOTUNE)
