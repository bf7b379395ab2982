"""mobileqat.Distiller: the QAT student learns from the labels and a frozen float teacher. The loss is checked
against numpy on a fixed batch for teachers/students ending in a softmax layer, in a Dense(activation="softmax")
or in logits; fit runs like any Keras fit, the teacher does not change, and the student exports to a file that
``mobileqat.lower`` reproduces."""
import numpy as np
import pytest

import mobileqat
from mobileqat import export, lowering, training
from mobileqat._tf import keras
from mobileqat.quantize import quantize
from mobileqat.runtime import TFLiteModel
from test_schedules import data, net

L = keras.layers
T, ALPHA = 3.0, 0.3


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _tempered(p, t):
    """softmax(log p / t) from probabilities p."""
    q = np.power(p.astype(np.float64), 1.0 / t)
    return q / q.sum(-1, keepdims=True)


def _numpy_loss(student_probs, student_logits, teacher_soft, y, t=T, alpha=ALPHA):
    p = np.clip(student_probs / student_probs.sum(-1, keepdims=True), 1e-7, 1 - 1e-7)  # Keras' cross-entropy
    hard = -np.mean(np.log(p[np.arange(len(y)), y]))
    log_q = np.log(_softmax(student_logits.astype(np.float64) / t))
    kd = t * t * np.mean(np.sum(teacher_soft * (np.log(teacher_soft) - log_q), -1))
    return alpha * hard + (1 - alpha) * kd, hard, kd


def _trained_float(model, x, y, from_logits=False):
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return model


def _check(d, x, y, student_probs, student_logits, teacher_soft):
    got, _ = d.losses_on(x, y)
    expected = _numpy_loss(student_probs, student_logits, teacher_soft, y)
    for key, value in zip(("loss", "student_loss", "distillation_loss"), expected):
        np.testing.assert_allclose(float(got[key]), value, rtol=2e-5, atol=1e-6, err_msg=key)


def test_loss_matches_numpy_for_a_softmax_layer_teacher_and_qat_student():
    x, y = data(32)
    teacher = _trained_float(net(), x, y)
    student = quantize(teacher)
    d = mobileqat.Distiller(student, teacher, temperature=T, alpha=ALPHA)
    d.compile("adam", "sparse_categorical_crossentropy")
    assert d.student_outputs_probabilities
    s_logits = keras.Model(student.inputs, student.layers[-1].input)(x).numpy()  # the softmax layer's input
    _check(d, x, y, student(x).numpy(), s_logits, _tempered(teacher(x).numpy(), T))


def test_loss_matches_numpy_for_logits_and_fused_softmax_models():
    x, y = data(32)
    keras.utils.set_random_seed(2)
    inp = keras.Input((12, 12, 3))
    h = L.GlobalAveragePooling2D()(L.Conv2D(6, 3, activation="relu")(inp))
    logits_teacher = _trained_float(keras.Model(inp, L.Dense(4)(h)), x, y, from_logits=True)
    fused_teacher = keras.Model(inp, L.Dense(4, activation="softmax")(L.Dense(5)(h)))  # softmax inside Dense
    logits_student = quantize(logits_teacher)
    d = training.Distiller(logits_student, fused_teacher, temperature=T, alpha=ALPHA)
    d.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert not d.student_outputs_probabilities
    z = logits_student(x).numpy()
    _check(d, x, y, _softmax(z.astype(np.float64)), z, _tempered(fused_teacher(x).numpy(), T))
    d2 = training.Distiller(fused_teacher, logits_teacher, temperature=T, alpha=ALPHA)  # roles swapped
    d2.compile("adam", "sparse_categorical_crossentropy")
    p = fused_teacher(x).numpy()
    _check(d2, x, y, p, np.log(p), _softmax(logits_teacher(x).numpy().astype(np.float64) / T))


def test_fit_trains_the_student_only_and_the_student_exports(tmp_path):
    x, y = data()
    teacher = _trained_float(net(), x, y)
    before = [w.numpy().copy() for w in teacher.weights]
    student = quantize(teacher)
    d = training.Distiller(student, teacher, temperature=T, alpha=ALPHA)
    d.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    s_before = [w.numpy().copy() for w in student.trainable_weights]
    history = d.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x[:16], y[:16])).history
    assert {"loss", "student_loss", "distillation_loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert all(np.isfinite(v) for vs in history.values() for v in vs)
    for w, b in zip(teacher.weights, before):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.name)
    assert any(not np.array_equal(w.numpy(), b) for w, b in zip(student.trainable_weights, s_before))
    np.testing.assert_array_equal(d.predict(x[:8], verbose=0), student.predict(x[:8], verbose=0))
    path = str(tmp_path / "student.tflite")
    export.export_tflite(d.student, path)
    m = TFLiteModel(path, "reference")
    codes = m.quantize_input(x[:8])
    out = np.concatenate([m.invoke_raw(codes[i:i + 1]) for i in range(len(codes))])
    np.testing.assert_array_equal(lowering.lower(student).run(codes, "reference"), out)


def test_bad_arguments_are_named():
    f = net()
    with pytest.raises(ValueError, match="alpha=1.5"):
        training.Distiller(f, f, alpha=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        training.Distiller(f, f, temperature=0)
    with pytest.raises(ValueError, match="must predict the same classes"):
        training.Distiller(f, net(classes=5))
