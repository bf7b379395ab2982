"""mobileqat.data.image_folder_stream: the same files, split and pixels as load_image_folder, read on
demand through tf.data; augmentation for training only; pixel scalings; cache."""
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from mobileqat import data

pytestmark = pytest.mark.filterwarnings(r"ignore:image_folder_stream\(.*skipped:UserWarning")  # the corrupt files


def _noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of mixed files (PNG, JPEG, BMP, GIF, RGBA, L, 16-bit, nested), a corrupt and a truncated
    file, a hidden class and a top-level file that are ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("stream") / "photos"
    for c in ("cat", "dog", "eel"):
        (root / c / "nested").mkdir(parents=True)
    for i in range(9):
        Image.fromarray(_noise(rng, 20 + i, 31)).save(root / "cat" / f"{i}.png")
        Image.fromarray(_noise(rng, 40, 25 + i)).save(root / "dog" / f"{i}.jpg", quality=90)
        Image.fromarray(_noise(rng, 13, 17 + i)).save(root / "eel" / ("nested" if i % 2 else "") / f"{i}.bmp")
    Image.fromarray(_noise(rng, 30, 30, 4), "RGBA").save(root / "cat" / "rgba.png")
    Image.fromarray(_noise(rng, 30, 30, 1), "L").save(root / "dog" / "gray.png")
    Image.fromarray(rng.integers(0, 65536, (19, 19), dtype=np.uint16)).save(root / "eel" / "sixteen.png")
    Image.fromarray(_noise(rng, 24, 24)).quantize(16).save(root / "eel" / "pal.gif")
    (root / "cat" / "corrupt.png").write_bytes(b"\x89PNG not really")
    blob = (root / "cat" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(blob[: len(blob) // 2])
    (root / ".thumbs").mkdir()
    Image.fromarray(_noise(rng, 8, 8)).save(root / ".thumbs" / "x.png")
    (root / "README.txt").write_text("ignored")
    return root


def _both(root, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = data.load_image_folder(root, **kw)
        st = data.image_folder_stream(root, workers=3, **kw)
    return ds, st, [str(w.message) for w in rec]


def _epoch(tf_dataset):
    xs, ys = zip(*tf_dataset.as_numpy_iterator())
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("kw", [dict(image_size=16, seed=0), dict(image_size=12, seed=7, test_fraction=0.5),
                                dict(image_size=10, seed=3, channels=1, max_per_class=4)])
def test_streamed_split_equals_the_in_memory_one(folder, kw):
    ds, st, messages = _both(folder, **kw)
    assert st.class_names == ds.class_names == ["cat", "dog", "eel"]
    assert st.skipped == ds.skipped and len(st.skipped) == (2 if kw.get("max_per_class") is None else len(ds.skipped))
    assert any(m.startswith("image_folder_stream(") for m in messages) == bool(st.skipped)
    for split in ("train", "test"):
        x, y = st.arrays(split)
        np.testing.assert_array_equal(x, getattr(ds, f"x_{split}"))  # the same files, in the same order, same bits
        np.testing.assert_array_equal(y, getattr(ds, f"y_{split}"))
        xt, yt = _epoch(st.dataset(split, batch_size=5, shuffle=False))  # the tf.data path gives the same bits
        np.testing.assert_array_equal(xt, x)
        np.testing.assert_array_equal(yt, y)
    for n in (5, 1000):  # calibration: the same stratified subset
        np.testing.assert_array_equal(data.calibration_subset(st, n, seed=2), data.calibration_subset(ds, n, seed=2))
    x_chunks = [x for x, _ in st.chunks("test", max_images=2)]
    assert max(len(x) for x in x_chunks) <= 2
    np.testing.assert_array_equal(np.concatenate(x_chunks), ds.x_test)
    s = st.summary()
    assert {k: s[k] for k in ds.summary()} == ds.summary() and s["streamed"] and s["pixels"] == "-1..1"
    assert st.fingerprint() == data.image_folder_stream(folder, **kw).fingerprint()


def test_augmentation_is_for_training_only(folder):
    st = data.image_folder_stream(folder, image_size=16, seed=0)
    x_train, y_train = st.arrays("train")
    with pytest.raises(ValueError, match="training only"):
        st.dataset("test", augment=True)
    with pytest.raises(ValueError, match="unknown"):
        st.dataset("train", augment=["rotate"])
    aug = st.dataset("train", batch_size=8, shuffle=False, augment=True, seed=1)
    x1, y1 = _epoch(aug)
    x2, _ = _epoch(aug)
    np.testing.assert_array_equal(y1, y_train)
    assert x1.shape == x_train.shape and x1.dtype == np.float32 and x1.min() >= -1.0 and x1.max() <= 1.0
    assert not np.array_equal(x1, x_train) and not np.array_equal(x1, x2)  # augmented, anew each epoch
    again, _ = _epoch(st.dataset("train", batch_size=8, shuffle=False, augment=True, seed=1))
    np.testing.assert_array_equal(again, x1)  # seeded
    flips, _ = _epoch(st.dataset("train", batch_size=8, shuffle=False, augment=["flip"], seed=1))
    mirrored = np.array([np.array_equal(f, x) or np.array_equal(f, x[:, ::-1]) for f, x in zip(flips, x_train)])
    assert mirrored.all() and 0 < sum(not np.array_equal(f, x) for f, x in zip(flips, x_train)) < len(x_train)
    # evaluation, calibration and the test split never see augmentation
    np.testing.assert_array_equal(_epoch(st.dataset("test", batch_size=4))[0], st.arrays("test")[0])
    np.testing.assert_array_equal(st.calibration(7), data.calibration_subset(st, 7))


def test_training_order_is_shuffled_every_epoch_and_seeded(folder):
    st = data.image_folder_stream(folder, image_size=8, seed=0)
    ds = st.dataset("train", batch_size=4, seed=5)
    assert int(ds.cardinality()) == -(-len(st.train_files) // 4)
    y1, y2 = _epoch(ds)[1], _epoch(ds)[1]
    assert sorted(y1) == sorted(st.y_train) and not np.array_equal(y1, y2)
    np.testing.assert_array_equal(_epoch(st.dataset("train", batch_size=4, seed=5))[1], y1)


def test_pixel_scalings_and_non_square_size(folder):
    base = data.image_folder_stream(folder, image_size=(12, 20), seed=0)
    x, _ = base.arrays("test")
    assert x.shape[1:] == (12, 20, 3) and base.input_shape == (12, 20, 3)
    raw = np.round((x.astype(np.float64) + 1) * 127.5).astype(np.uint8)
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    for pixels, kw, expected in (("0..1", {}, raw / np.float32(255)), ("0..255", {}, raw.astype(np.float32)),
                                 ("mean_std", dict(mean=mean, std=std),
                                  (raw.astype(np.float32) - np.float32(mean)) / np.float32(std))):
        st = data.image_folder_stream(folder, image_size=(12, 20), seed=0, pixels=pixels, **kw)
        got, _ = st.arrays("test")
        np.testing.assert_array_equal(got, expected.astype(np.float32))
        np.testing.assert_array_equal(_epoch(st.dataset("test", batch_size=3))[0], got)  # tf == numpy, bit for bit
        assert st.fingerprint() != base.fingerprint()
    gray = data.image_folder_stream(folder, image_size=8, channels=1, pixels="mean_std", mean=127.5, std=64)
    assert gray.arrays("test")[0].shape[-1] == 1
    for kw, match in ((dict(pixels="0..2"), "pixels="), (dict(pixels="0..1", mean=[1, 2, 3]), "mean/std are given"),
                      (dict(pixels="mean_std"), "needs mean and std"),
                      (dict(pixels="mean_std", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
                       "0..1 units.*multiply them by 255"),
                      (dict(pixels="mean_std", mean=[1, 2], std=[50]), "give 3 finite"),
                      (dict(pixels="mean_std", mean=[1], std=[0]), "std"), (dict(image_size=(8, 4)), "image_size")):
        with pytest.raises(ValueError, match=match):
            data.image_folder_stream(folder, **kw)


def test_cache_file_replays_the_decoded_images(folder, tmp_path):
    st = data.image_folder_stream(folder, image_size=8, seed=0)
    prefix = tmp_path / "cache" / "train"
    prefix.parent.mkdir()
    ds = st.dataset("train", batch_size=4, shuffle=False, cache=prefix)
    first = _epoch(ds)
    assert any(name.startswith("train") for name in os.listdir(prefix.parent))
    second = _epoch(ds)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first[0], st.arrays("train")[0])
    shuffled = st.dataset("train", batch_size=4, cache=prefix, seed=2)  # a complete cache, then a seeded shuffle
    assert sorted(_epoch(shuffled)[1]) == sorted(st.y_train)


def test_same_refusals_as_the_in_memory_loader(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder_stream(tmp_path / "nowhere")
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least 2"):
        data.image_folder_stream(tmp_path)
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match="empty.*no readable image"):
        data.image_folder_stream(tmp_path)
