"""Training: model.fit with a cosine schedule, step timing and resumable checkpoints."""
import os
import time

import numpy as np

from mobileqat import faults
from mobileqat._tf import keras


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training batch; ``median_s`` skips the first 3 (tracing)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t0)
        faults.point("train_step")

    @property
    def median_s(self):
        steady = self.times[3:] or self.times
        return float(np.median(steady)) if steady else float("nan")


def fit(model, x, y, epochs, batch_size=64, learning_rate=1e-3, from_logits=False, checkpoint_dir=None,
        validation_data=None, seed=0, verbose=1):
    """Compile ``model`` (Adam, cosine decay to 0, sparse cross-entropy) and train it.

    x: (N, H, W, C) float32 images, y: (N,) int labels; or x a tf.data.Dataset of (images, labels)
    batches with a known number of batches (e.g. ``ImageFolderStream.dataset``), y None and batch_size
    unused (the dataset batches and shuffles). With ``checkpoint_dir`` an interrupted run
    resumes from the last finished epoch (keras BackupAndRestore; the backup is removed on success).
    Returns {"history": {metric: [per epoch]}, "step_s": median seconds per training step}.
    """
    streamed = y is None and hasattr(x, "element_spec")
    if streamed:
        batches = int(x.cardinality())
        if batches < 1:
            raise ValueError(f"fit: the dataset has {'an unknown number of' if batches < 0 else 'no'} batches; "
                             "pass a finite, non-empty tf.data.Dataset of (images, labels) batches.")
        steps = batches * max(1, epochs)
    else:
        steps = int(np.ceil(len(x) / batch_size)) * max(1, epochs)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])
    timer = StepTimer()
    callbacks = [timer]
    if checkpoint_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(os.fspath(checkpoint_dir)))
    keras.utils.set_random_seed(seed)
    if streamed:
        history = model.fit(x, epochs=epochs, callbacks=callbacks, validation_data=validation_data, verbose=verbose)
    else:
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, callbacks=callbacks,
                            validation_data=validation_data, verbose=verbose)
    return {"history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
            "step_s": timer.median_s}
