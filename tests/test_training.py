"""training.fit: an interrupted run resumes from its last finished epoch; step times are measured."""
import numpy as np
import pytest

from mobileqat import training
from mobileqat._tf import keras


class _Interrupt(Exception):
    pass


class _StopAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Interrupt()


def _model():
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(8, activation="relu")(inp)))


def test_interrupted_fit_resumes_from_last_epoch(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype(np.float32), rng.integers(0, 2, 64)
    model = _model()
    original_fit = keras.Model.fit

    def fit_with_crash(self, *args, **kwargs):
        kwargs["callbacks"] = list(kwargs["callbacks"]) + [_StopAfterEpoch(1)]
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit_with_crash)
    with pytest.raises(_Interrupt):
        training.fit(model, x, y, epochs=4, batch_size=16, checkpoint_dir=tmp_path / "ckpt", verbose=0)
    monkeypatch.setattr(keras.Model, "fit", original_fit)
    assert any((tmp_path / "ckpt").iterdir())  # a backup was left for the next run
    result = training.fit(_model(), x, y, epochs=4, batch_size=16, checkpoint_dir=tmp_path / "ckpt", verbose=0)
    assert len(result["history"]["loss"]) == 2  # epochs 3 and 4 only: 1 and 2 were restored
    assert result["step_s"] > 0
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # removed on success
