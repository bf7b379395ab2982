"""mobileqat.data: synthetic shapes, image folders, calibration subsets, tf.data pipelines."""
import json

import numpy as np
import pytest
from PIL import Image

from mobileqat import data


def _rows(x):
    return {row.tobytes() for row in x.reshape(len(x), -1)}


# ------------------------------------------------------------------------------------------ synthetic


@pytest.fixture(scope="module")
def shapes():
    return data.synthetic_shapes(n_train=100, n_test=40, seed=0)


def test_synthetic_shapes_arrays(shapes):
    ds = shapes
    assert ds.name == "synthetic_shapes"
    assert ds.x_train.shape == (100, 32, 32, 3) and ds.x_test.shape == (40, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.min() >= -1.0 and ds.x_train.max() <= 1.0
    assert ds.x_train.std() > 0.2  # real images, not a constant
    assert ds.input_shape == (32, 32, 3) and ds.classes == 10 and len(ds.class_names) == 10
    assert ds.skipped == []
    s = ds.summary()
    assert s == {"name": "synthetic_shapes", "train": 100, "test": 40, "input_shape": [32, 32, 3], "classes": 10}
    json.dumps(s)
    assert all(type(v) is int for v in s["input_shape"])


def test_synthetic_shapes_balanced_and_disjoint(shapes):
    assert np.bincount(shapes.y_train, minlength=10).tolist() == [10] * 10
    assert np.bincount(shapes.y_test, minlength=10).tolist() == [4] * 10
    assert len(_rows(shapes.x_train)) == 100  # no duplicates inside a split
    assert not _rows(shapes.x_train) & _rows(shapes.x_test)


def test_synthetic_shapes_deterministic(shapes):
    again = data.synthetic_shapes(n_train=100, n_test=40, seed=0)
    np.testing.assert_array_equal(again.x_train, shapes.x_train)
    np.testing.assert_array_equal(again.y_train, shapes.y_train)
    np.testing.assert_array_equal(again.x_test, shapes.x_test)
    other = data.synthetic_shapes(n_train=100, n_test=40, seed=1)
    assert not np.array_equal(other.x_train, shapes.x_train)
    assert not np.array_equal(other.x_test, shapes.x_test)


def test_synthetic_shapes_test_split_independent_of_n_train(shapes):
    # the CLI evaluates on synthetic_shapes(n_train=0, n_test=...): it must be the same test set
    eval_only = data.synthetic_shapes(n_train=0, n_test=40, seed=0)
    assert eval_only.x_train.shape == (0, 32, 32, 3) and eval_only.input_shape == (32, 32, 3)
    np.testing.assert_array_equal(eval_only.x_test, shapes.x_test)
    np.testing.assert_array_equal(eval_only.y_test, shapes.y_test)
    prefix = data.synthetic_shapes(n_train=35, n_test=0, seed=0)
    np.testing.assert_array_equal(prefix.x_train, shapes.x_train[:35])
    np.testing.assert_array_equal(prefix.y_train, shapes.y_train[:35])


def test_synthetic_shapes_grayscale_and_options():
    gray = data.synthetic_shapes(n_train=20, n_test=10, channels=1, seed=3)
    assert gray.x_train.shape == (20, 32, 32, 1) and gray.input_shape == (32, 32, 1)
    assert gray.x_train.min() >= -1.0 and gray.x_train.max() <= 1.0 and gray.x_train.std() > 0.1
    clean = data.synthetic_shapes(n_train=20, n_test=0, image_size=16, noise=0.0, difficulty=0.0)
    assert clean.x_train.shape == (20, 16, 16, 3)
    big = data.synthetic_shapes(n_train=10, n_test=0, image_size=96, difficulty=2.0)
    assert big.x_train.shape == (10, 96, 96, 3)
    for bad in (dict(channels=2), dict(image_size=4), dict(difficulty=-1.0), dict(n_train=-1)):
        with pytest.raises(ValueError):
            data.synthetic_shapes(**{"n_train": 10, "n_test": 0, **bad})


def test_normalize():
    out = data.normalize(np.array([0, 127.5, 255], np.float32))
    np.testing.assert_array_equal(out, np.array([-1.0, 0.0, 1.0], np.float32))
    assert data.normalize(np.zeros((2, 2), np.uint8)).dtype == np.float32


# ------------------------------------------------------------------------------------------ folders


def _noise_rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _build_folder(root, rng):
    """Classes a (RGB, RGBA, L, LA, P, P+transparency, I;16, 1, JPEG RGB and CMYK, a nested file),
    b (png + a corrupt and a truncated file), c (bmp/webp/tif/tiff). Returns the broken paths."""
    a, b, c = (root / n for n in "abc")
    for d in (a, b, c, a / "nested" / "deeper", root / ".cache"):
        d.mkdir(parents=True)
    Image.fromarray(_noise_rgb(rng, 20, 13), "RGB").save(a / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (9, 30, 4), dtype=np.uint8), "RGBA").save(a / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(a / "gray.png")
    Image.fromarray(_noise_rgb(rng, 24, 24), "RGB").quantize(16).save(a / "pal.gif")
    Image.fromarray(rng.integers(0, 65536, (17, 17), dtype=np.uint16)).save(a / "sixteen.png")
    Image.fromarray(_noise_rgb(rng, 50, 70), "RGB").save(a / "photo.jpg", quality=90)
    Image.fromarray(_noise_rgb(rng, 12, 12), "RGB").save(a / "nested" / "deeper" / "UPPER.PNG")
    Image.fromarray(_noise_rgb(rng, 12, 12), "RGB").convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 2, (10, 10), dtype=np.uint8) * 255, "L").convert("1").save(a / "bw.png")
    Image.fromarray(rng.integers(0, 256, (11, 11, 2), dtype=np.uint8), "LA").save(a / "la.png")
    pal = Image.fromarray(_noise_rgb(rng, 14, 14), "RGB").quantize(8)
    pal.save(a / "transparent.gif", transparency=0)
    (a / "notes.txt").write_text("not an image")
    (a / ".hidden.png").write_bytes(b"hidden files are ignored, even broken ones")
    for i in range(6):
        Image.fromarray(_noise_rgb(rng, 16, 16), "RGB").save(b / f"img{i}.png")
    corrupt = b / "x.png"
    corrupt.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    Image.fromarray(_noise_rgb(rng, 64, 64), "RGB").save(b / "full.png")
    truncated = b / "truncated.png"
    blob = (b / "full.png").read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    (b / "full.png").unlink()
    for i, ext in enumerate(["bmp", "webp", "tif", "tiff", "BMP"]):
        Image.fromarray(_noise_rgb(rng, 8 + i, 10), "RGB").save(c / f"c{i}.{ext}")
    Image.fromarray(_noise_rgb(rng, 8, 8), "RGB").save(root / ".cache" / "ignored.png")
    (root / "README.txt").write_text("top-level files are ignored")
    return sorted([str(corrupt), str(truncated)])


@pytest.fixture
def folder(tmp_path, rng):
    root = tmp_path / "mixed"
    broken = _build_folder(root, rng)
    return root, broken


def test_load_image_folder_modes_and_skips(folder):
    root, broken = folder
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as rec:
        ds = data.load_image_folder(root, image_size=16, seed=0)
    assert broken[0] in str(rec[0].message)
    assert ds.name == "mixed"
    assert ds.class_names == ["a", "b", "c"]
    assert sorted(p for p, _ in ds.skipped) == broken
    assert all(reason for _, reason in ds.skipped)
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=3).tolist()
    assert counts == [11, 6, 5]
    assert ds.x_train.shape[1:] == (16, 16, 3) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64
    assert ds.x_train.min() >= -1.0 and ds.x_train.max() <= 1.0
    # stratified: round(n * 0.2) test images per class, at least one
    assert np.bincount(ds.y_test, minlength=3).tolist() == [2, 1, 1]
    assert not _rows(ds.x_train) & _rows(ds.x_test)

    with pytest.warns(UserWarning, match="skipped 2"):
        gray = data.load_image_folder(root, image_size=8, channels=1, test_fraction=0.5)
    assert gray.x_train.shape[1:] == (8, 8, 1) and len(gray.x_train) + len(gray.x_test) == 22
    assert np.bincount(gray.y_test, minlength=3).tolist() == [6, 3, 2]


def test_load_image_folder_split_is_deterministic(folder):
    root, _ = folder
    with pytest.warns(UserWarning):
        one = data.load_image_folder(root, image_size=12, seed=5)
    with pytest.warns(UserWarning):
        two = data.load_image_folder(root, image_size=12, seed=5)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    with pytest.warns(UserWarning):
        capped = data.load_image_folder(root, image_size=12, seed=5, max_per_class=3)
    with pytest.warns(UserWarning):
        capped2 = data.load_image_folder(root, image_size=12, seed=5, max_per_class=3)
    assert np.bincount(np.concatenate([capped.y_train, capped.y_test])).tolist() == [3, 3, 3]
    np.testing.assert_array_equal(capped.x_train, capped2.x_train)


def test_load_image_folder_pixel_values(tmp_path):
    root = tmp_path / "solid"
    (root / "red").mkdir(parents=True)
    (root / "zmix").mkdir()
    Image.new("RGB", (23, 11), (255, 0, 0)).save(root / "red" / "r.png")
    Image.new("RGBA", (5, 7), (200, 100, 50, 128)).save(root / "zmix" / "half_alpha.png")
    Image.fromarray(np.full((9, 9), 257 * 100, np.uint16)).save(root / "zmix" / "i16.png")
    ramp = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    Image.fromarray(ramp.astype(np.uint8), "RGB").save(root / "zmix" / "ramp.png")

    ds = data.load_image_folder(root, image_size=16, test_fraction=0.0)
    assert len(ds.x_test) == 0 and ds.x_test.shape[1:] == (16, 16, 3)
    x, y = ds.x_train, ds.y_train
    red = x[y == 0]
    assert red.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(red[..., 0], 1.0)
    np.testing.assert_array_equal(red[..., 1:], -1.0)
    mix = x[y == 1]
    expected_ramp = ramp.astype(np.float32) / 127.5 - 1.0  # same size: resize is the identity
    expected_alpha = np.round(np.array([200, 100, 50]) * 128 / 255) / 127.5 - 1.0  # composited on black
    expected_i16 = np.full(3, 100 / 127.5 - 1.0)  # 16-bit 25700 -> 8-bit 100
    found = {"ramp": False, "alpha": False, "i16": False}
    for img in mix:
        if np.allclose(img, expected_ramp, atol=1e-6):
            found["ramp"] = True
        elif np.allclose(img, expected_alpha, atol=1e-6):
            found["alpha"] = True
        elif np.allclose(img, expected_i16, atol=1e-6):
            found["i16"] = True
    assert all(found.values()), found

    gray = data.load_image_folder(root, image_size=16, channels=1, test_fraction=0.0)
    luma = round(0.299 * 255)  # ITU-R 601-2 luma of pure red = 76
    np.testing.assert_allclose(gray.x_train[gray.y_train == 0], luma / 127.5 - 1.0, atol=1e-6)


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_image_folder(tmp_path / "nowhere")
    afile = tmp_path / "file.png"
    Image.new("RGB", (8, 8)).save(afile)
    with pytest.raises(ValueError, match="not a folder"):
        data.load_image_folder(afile)

    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "only" / "a.png")
    (one / ".hidden_class").mkdir()
    with pytest.raises(ValueError, match="at least 2"):
        data.load_image_folder(one)

    empty = tmp_path / "empty"
    (empty / "full").mkdir(parents=True)
    (empty / "void").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "full" / "a.png")
    (empty / "void" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="void.*no readable image"):
        data.load_image_folder(empty)
    (empty / "void" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="bad.jpg"), pytest.raises(ValueError, match="void.*1 unreadable"):
        data.load_image_folder(empty)

    ok = tmp_path / "ok"
    for c in "xy":
        (ok / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(ok / c / "a.png")
    with pytest.raises(ValueError, match="image_size"):
        data.load_image_folder(ok, image_size=4)
    single = data.load_image_folder(ok, image_size=8)  # one image per class: all of it is training data
    assert len(single.x_train) == 2 and len(single.x_test) == 0


# ------------------------------------------------------------------------------------- calibration/tf


def test_calibration_subset(shapes):
    calib = data.calibration_subset(shapes, n=50, seed=0)
    assert calib.shape == (50, 32, 32, 3) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib, data.calibration_subset(shapes, n=50, seed=0))
    assert not np.array_equal(calib, data.calibration_subset(shapes, n=50, seed=1))
    train_rows = [r.tobytes() for r in shapes.x_train.reshape(100, -1)]
    labels = [int(shapes.y_train[train_rows.index(r.tobytes())]) for r in calib.reshape(50, -1)]
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10  # stratified
    everything = data.calibration_subset(shapes, n=1000)
    assert len(everything) == 100 and _rows(everything) == _rows(shapes.x_train)
    with pytest.raises(ValueError, match="no training images"):
        data.calibration_subset(data.synthetic_shapes(n_train=0, n_test=10), n=8)


def test_as_tf_dataset(shapes):
    ds = data.as_tf_dataset(shapes.x_train, shapes.y_train, batch_size=32)
    batches = list(ds.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].shape == (32, 32, 32, 3) and batches[0][0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), shapes.y_train)

    shuffled = data.as_tf_dataset(shapes.x_train, shapes.y_train, batch_size=32, shuffle=True, seed=3)
    y1 = np.concatenate([b[1] for b in shuffled.as_numpy_iterator()])
    y2 = np.concatenate([b[1] for b in shuffled.as_numpy_iterator()])
    assert sorted(y1.tolist()) == sorted(shapes.y_train.tolist())
    assert not np.array_equal(y1, shapes.y_train)
    assert not np.array_equal(y1, y2)  # reshuffled every epoch
    again = data.as_tf_dataset(shapes.x_train, shapes.y_train, batch_size=32, shuffle=True, seed=3)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in again.as_numpy_iterator()]), y1)

    x_only = list(data.as_tf_dataset(shapes.x_test, None, batch_size=16).as_numpy_iterator())
    assert [b.shape[0] for b in x_only] == [16, 16, 8]
