"""QAT schedules as Keras callbacks (mobileqat.training): quantization delay, batch-norm freeze, single-conv
BN folding, gradual weight bit width. Each checked against an independent reference: the float model trained
the same way, numpy batch norm, the exported file on the reference kernels and XNNPACK via ``mobileqat.lower``."""
import numpy as np
import pytest

from mobileqat import export, lowering, training
from mobileqat._tf import keras, tf
from mobileqat.layers import FoldedConvBN
from mobileqat.quantize import load_qat_model, quantize
from mobileqat.quantizers import WeightQuantizer
from mobileqat.runtime import TFLiteModel

L = keras.layers


def net(seed=1, classes=4):
    """12x12x3 -> classes: conv+BN+ReLU6 (stride 2), depthwise+BN+ReLU6, GAP, Dense, softmax."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="c1")(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    x = L.Dense(classes, name="fc")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Activation("softmax")(x), name="sched_net")


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 12, 12, 3)).astype(np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(int) + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    return x, y


def _sgd(model):
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    return model


class _Record(keras.callbacks.Callback):
    """The schedule's state at every training batch."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.states = schedule, []

    def on_train_batch_begin(self, batch, logs=None):
        self.states.append(self.schedule.state)


def test_quantization_delay_trains_the_float_model_then_quantizes():
    x, y = data()
    f, q = _sgd(net()), _sgd(quantize(net()))
    delay = training.QuantizationDelay(6)
    f.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 4 steps
    rec = _Record(delay)
    q.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[delay, rec])
    assert rec.states == [True] * 4
    # after 4 float steps of both: the QAT model (quantizers bypassed) is the float model, in both modes
    delay._set(True)
    np.testing.assert_allclose(q(x, training=False).numpy(), f(x, training=False).numpy(), atol=2e-6)
    np.testing.assert_allclose(q(x, training=True).numpy(), f(x, training=True).numpy(), atol=2e-6)
    delay._set(False)
    # ranges were recorded during the delay: the activation quantizers saw data
    seen = [w for w in q.weights if w.name.endswith("_seen:0")]
    assert seen and all(float(w.numpy()) == 1.0 for w in seen)
    # after fit the model is quantized (softmax output on its 1/256 grid), and steps 6.. run with fake quant on
    out = q(x).numpy()
    np.testing.assert_array_equal(out * 256, np.round(out * 256))
    rec.states.clear()
    q.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[delay, rec])
    assert rec.states == [True, True, False, False]  # the optimizer's step count carries over: 4, 5 | 6, 7
    assert not any(qz.bypass for qz in training.quantizers_of(q))


def test_quantization_delay_refuses_a_negative_delay():
    with pytest.raises(ValueError, match="steps=-1"):
        training.QuantizationDelay(-1)
