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
        validation_data=None, seed=0, verbose=1, warmup=0.0, callbacks=()):
    """Compile ``model`` (Adam, cosine decay to 0, sparse cross-entropy) and train it.

    warmup: fraction of the steps (0 <= warmup < 1) over which the learning rate rises linearly from 0 to
    ``learning_rate`` before the cosine decay. callbacks: more Keras callbacks (e.g. the QAT schedules below).

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
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"fit: warmup={warmup!r} is a fraction of the training steps; use 0 <= warmup < 1.")
    warm = int(round(warmup * steps))
    if warm:
        schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=steps - warm, warmup_target=learning_rate,
                                                          warmup_steps=warm)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
                  metrics=["accuracy"])
    timer = StepTimer()
    callbacks = [timer, *callbacks]
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


# --- QAT schedules: Keras callbacks that switch quantizers and folded batch norms during model.fit -------------

def quantizers_of(model):
    """Every fake quantizer object of a QAT model (``mobileqat.quantizers`` / tfmot ``Quantizer``), each once:
    the ones tfmot's wrappers hold (weights, outputs, the input) and those inside layers (FoldedConvBN's weight
    quantizer, HardSigmoid's relu6 quantizer)."""
    from mobileqat._tf import tfmot
    base = tfmot.quantization.keras.quantizers.Quantizer
    found, seen = [], set()

    def visit(obj, depth=0):
        if isinstance(obj, base):
            if id(obj) not in seen:
                seen.add(id(obj))
                found.append(obj)
        elif isinstance(obj, (list, tuple)) and depth < 2:
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, tfmot.quantization.keras.QuantizeConfig) and depth == 0:
            for item in vars(obj).values():
                visit(item, 1)
    for layer in model.submodules:
        if isinstance(layer, keras.layers.Layer):
            for value in list(vars(layer).values()):
                visit(value)
    return found


def folded_layers(model):
    """The ``FoldedConvBN`` layers of a QAT model (inside tfmot's wrappers too)."""
    from mobileqat.layers import FoldedConvBN
    return [layer for layer in model.submodules if isinstance(layer, FoldedConvBN)]


def set_bn_folding(model, folding):
    """Train every FoldedConvBN of ``model`` with ``folding`` ("two_pass" or "single_conv", see
    ``mobileqat.layers.FoldedConvBN``); takes effect at the next trace (compile or fit)."""
    from mobileqat.layers import FOLDINGS
    if folding not in FOLDINGS:
        raise ValueError(f"set_bn_folding: folding={folding!r}; use one of {FOLDINGS}.")
    for layer in folded_layers(model):
        layer.folding = folding
    _retrace(model)
    return model


def _retrace(model):
    """Drop the model's traced train/test/predict functions so the next call traces the layers' new state; in
    ``model.fit`` the train function is made again at once (fit calls ``model.train_function`` every step)."""
    if getattr(model, "train_function", None) is not None:
        model.train_function = model.make_train_function(force=True)
    model.test_function = None
    model.predict_function = None


class _StepSchedule(keras.callbacks.Callback):
    """Base of the schedule callbacks: ``_apply(step)`` before every training batch, ``step`` counting the
    optimizer's updates (so a run resumed by BackupAndRestore continues the schedule where it was)."""

    unit = "step"

    def __init__(self, unit="step"):
        super().__init__()
        if unit not in ("step", "epoch"):
            raise ValueError(f"{type(self).__name__}: unit={unit!r}; use 'step' or 'epoch'.")
        self.unit = unit
        self._step = None
        self.state = None  # what _apply last set (for logs and tests)

    def _steps(self, at):
        """``at`` (in self.unit) in optimizer steps."""
        if self.unit == "step":
            return int(at)
        per_epoch = (self.params or {}).get("steps")
        if not per_epoch:
            raise ValueError(f"{type(self).__name__}(unit='epoch') needs fit's steps per epoch; give the schedule "
                             "in steps (unit='step') for data of unknown length.")
        return int(at) * int(per_epoch)

    def on_train_begin(self, logs=None):
        self._step = None
        self.state = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is None:  # read once: after BackupAndRestore has restored the optimizer
            self._step = int(self.model.optimizer.iterations.numpy())
        state = self._state(self._step)
        if state != self.state:
            self._set(state)
            self.state = state
            _retrace(self.model)
        self._step += 1


def _is_input_quantizer(layer):
    return type(layer).__name__ == "QuantizeLayer"  # tfmot's, which quantize_apply puts after the input


class _BypassedQuantizer:
    """Stands in for a tfmot quantizer while fake quantization is off: runs it (its range is recorded) and
    returns the input unquantized."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def __call__(self, inputs, training, weights, **kwargs):
        from mobileqat._tf import tf
        out = self.quantizer(inputs, training, weights, **kwargs)
        with tf.control_dependencies([out]):
            return tf.identity(inputs)

    def get_config(self):
        return self.quantizer.get_config()


class QuantizationDelay(_StepSchedule):
    """Float training for the first ``steps`` optimizer steps (every fake quantizer bypassed, ranges still
    recorded), fake quantization from then on. ``unit="epoch"`` counts ``steps`` in epochs."""

    def __init__(self, steps, unit="step"):
        super().__init__(unit)
        if int(steps) < 0:
            raise ValueError(f"QuantizationDelay: steps={steps!r} must be >= 0.")
        self.steps = int(steps)

    def _state(self, step):
        return step < self._steps(self.steps)  # True: bypassed

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        from mobileqat.quantizers import _Base
        inputs = {id(layer.quantizer) for layer in self.model.submodules
                  if _is_input_quantizer(layer)}
        foreign = [type(q).__name__ for q in quantizers_of(self.model)
                   if not isinstance(q, (_Base, _BypassedQuantizer)) and id(q) not in inputs]
        if foreign:
            raise ValueError(f"QuantizationDelay cannot bypass quantizers of class {sorted(set(foreign))}: only "
                             "mobileqat.quantizers (and tfmot's input QuantizeLayer) have the switch; quantize with "
                             "mobileqat's schemes, or train without a quantization delay.")

    def _set(self, bypass):
        for layer in self.model.submodules:  # tfmot's input quantizer: proxied while bypassed
            if _is_input_quantizer(layer) and layer.quantizer is not None:
                wrapped = isinstance(layer.quantizer, _BypassedQuantizer)
                if bypass and not wrapped:
                    layer.quantizer = _BypassedQuantizer(layer.quantizer)
                elif not bypass and wrapped:
                    layer.quantizer = layer.quantizer.quantizer
        for q in quantizers_of(self.model):
            if not isinstance(q, _BypassedQuantizer):
                q.bypass = bypass

    def on_train_end(self, logs=None):
        if self.state:  # training ended inside the delay: the model is still a QAT model after fit
            self._set(False)
            self.state = False
            _retrace(self.model)


class FreezeBatchNorm(_StepSchedule):
    """From optimizer step ``step`` on, every FoldedConvBN trains with its moving statistics, which stop
    updating (``batch_statistics=False``: one convolution with the folded, quantized kernel, as at inference).
    The freeze stays in the model (and its saved config)."""

    def __init__(self, step, unit="step"):
        super().__init__(unit)
        if int(step) < 0:
            raise ValueError(f"FreezeBatchNorm: step={step!r} must be >= 0.")
        self.step = int(step)

    def _state(self, step):
        return step >= self._steps(self.step)  # True: frozen

    def _set(self, frozen):
        if frozen:
            for layer in folded_layers(self.model):
                layer.batch_statistics = False


def parse_bit_schedule(text):
    """'8:0,6:2,4:4' -> {0: 8, 2: 6, 4: 4}: comma-separated BITS:START pairs (weights on BITS bits from START on)."""
    schedule = {}
    for part in str(text).split(","):
        try:
            bits, start = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"bit schedule {text!r}: {part!r} is not BITS:START (e.g. '8:0,6:2,4:4': 8-bit weights "
                             "from 0, 6-bit from 2, 4-bit from 4)") from None
        if start in schedule:
            raise ValueError(f"bit schedule {text!r}: start {start} is given twice.")
        schedule[start] = bits
    return schedule


class BitSchedule(_StepSchedule):
    """Weight bit width by training progress, e.g. ``BitSchedule({0: 8, 2: 6, 4: 4}, unit="epoch")``: weights on
    the 8-bit grid in epochs 0-1, 6-bit in 2-3, 4-bit from epoch 4 on. A weight quantizer never goes below its
    own ``num_bits`` (the exported width; 8-bit first/last layers of a mixed scheme stay 8-bit), so the schedule
    must end at or below the narrowest weight quantizer's ``num_bits``; once it reaches its last entry every
    quantizer trains on the grid it exports, which ``mobileqat.lower`` reproduces."""

    def __init__(self, schedule, unit="step"):
        super().__init__(unit)
        if isinstance(schedule, str):
            schedule = parse_bit_schedule(schedule)
        schedule = {int(k): int(v) for k, v in dict(schedule).items()}
        if not schedule or min(schedule) != 0:
            raise ValueError(f"BitSchedule {schedule}: the schedule must start at 0 (e.g. {{0: 8, 2: 6, 4: 4}}).")
        widths = [schedule[k] for k in sorted(schedule)]
        if any(not 2 <= b <= 8 for b in widths) or any(a < b for a, b in zip(widths, widths[1:])):
            raise ValueError(f"BitSchedule {schedule}: bit widths must lie in 2..8 and never grow.")
        self.schedule = dict(sorted(schedule.items()))

    def _weight_quantizers(self):
        from mobileqat.quantizers import WeightQuantizer
        return [q for q in quantizers_of(self.model) if isinstance(q, WeightQuantizer)]

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        qs = self._weight_quantizers()
        if not qs:
            raise ValueError("BitSchedule: the model has no mobileqat WeightQuantizer (min-max weights; learned LSQ "
                             "steps keep their bit width); pass a QAT model from mobileqat.quantize with "
                             "weight_method 'minmax'.")
        last, low = list(self.schedule.values())[-1], min(q.num_bits for q in qs)
        if last > low:
            raise ValueError(f"BitSchedule {self.schedule}: it ends at {last} bits, but weights are exported on "
                             f"{low} bits; end the schedule at {low} (or quantize with {last}-bit weights).")

    def _state(self, step):
        bits = 8
        for start, b in self.schedule.items():
            if step >= self._steps(start):
                bits = b
        return bits

    def _set(self, bits):
        for q in self._weight_quantizers():
            q.train_bits = None if bits <= q.num_bits else bits

    def on_train_end(self, logs=None):
        if self.state is not None and self.state != list(self.schedule.values())[-1]:
            import warnings
            warnings.warn(f"BitSchedule: training ended at {self.state}-bit weights, before the schedule's last "
                          "entry; the model exports (and lowers) its quantizers' own num_bits.")
        self._set(0)  # every quantizer back to its own num_bits
        _retrace(self.model)


# --- Distillation ---------------------------------------------------------------------------------------------

def _with_logits(model):
    """(a model giving (logits, outputs) of ``model``, whether ``outputs`` are probabilities). For a model that
    ends in a softmax layer (a QAT model's wrapped one too) the logits are that layer's input; a model whose last
    layer applies softmax itself gives log-probabilities (softmax(log p / T) is the same softened distribution)."""
    from mobileqat._tf import tf
    last = model.outputs[0]._keras_history.layer
    inner = getattr(last, "layer", last)  # tfmot's QuantizeWrapper holds the layer
    if isinstance(inner, keras.layers.Softmax) or (
            type(inner) is keras.layers.Activation and getattr(inner.activation, "__name__", None) == "softmax"):
        return keras.Model(model.inputs, [last.input, model.outputs[0]]), True
    if getattr(getattr(inner, "activation", None), "__name__", None) == "softmax":
        return keras.Model(model.inputs, [tf.math.log(tf.maximum(model.outputs[0], 1e-12)), model.outputs[0]]), True
    return keras.Model(model.inputs, [model.outputs[0], model.outputs[0]]), False


def distillation_loss(student_logits, teacher_logits, temperature):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch; logits (N, classes)."""
    from mobileqat._tf import tf
    t = float(temperature)
    p = tf.nn.softmax(teacher_logits / t, axis=-1)
    log_q = tf.nn.log_softmax(student_logits / t, axis=-1)
    log_p = tf.nn.log_softmax(teacher_logits / t, axis=-1)
    return t * t * tf.reduce_mean(tf.reduce_sum(p * (log_p - log_q), axis=-1))


class Distiller(keras.Model):
    """Train ``student`` (the QAT model) against a frozen ``teacher`` (the float model) and the labels.

    loss = alpha * hard_loss(y, student(x)) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    hard_loss is the loss given to ``compile`` (for the student's own outputs, probabilities or logits, as usual);
    the KL term uses each model's logits: the input of a final softmax layer, log-probabilities when the last
    layer applies softmax itself, the outputs otherwise (a logits model). ``compile``/``fit``/``evaluate`` work as
    for any Keras model; metrics and ``predict`` are the student's. The teacher runs in inference mode and is
    never updated (only the student's variables train). Save and export ``distiller.student``.

    Args:
      student, teacher: functional Keras models with one output (N, classes), the same input.
      temperature: T > 0 softening both distributions (Hinton et al. 2015; the T^2 keeps the gradient scale).
      alpha: weight of the hard-label loss, 0 <= alpha <= 1.
    """

    def __init__(self, student, teacher, temperature=4.0, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.check_arguments(temperature, alpha)
        for role, m in (("student", student), ("teacher", teacher)):
            if len(getattr(m, "outputs", None) or ()) != 1:
                raise ValueError(f"Distiller: the {role} '{m.name}' must be a functional model with one output "
                                 "(N, classes).")
        if tuple(student.output_shape) != tuple(teacher.output_shape):
            raise ValueError(f"Distiller: student '{student.name}' outputs {student.output_shape}, teacher "
                             f"'{teacher.name}' {teacher.output_shape}; they must predict the same classes.")
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = float(temperature), float(alpha)
        self._student_pair, self.student_outputs_probabilities = _with_logits(student)
        self._teacher_pair, _ = _with_logits(teacher)
        self._trackers = {k: keras.metrics.Mean(name=k) for k in ("loss", "student_loss", "distillation_loss")}

    @staticmethod
    def check_arguments(temperature, alpha):
        if not temperature > 0:
            raise ValueError(f"Distiller: temperature={temperature!r} must be > 0 (e.g. 4).")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Distiller: alpha={alpha!r} is the hard-label loss weight; use 0 <= alpha <= 1.")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def losses_on(self, x, y, training=False):
        """{"loss", "student_loss", "distillation_loss"} on one batch (scalars), without updating anything when
        ``training`` is False."""
        from mobileqat._tf import tf
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        t_logits, _ = self._teacher_pair(x, training=False)
        s_logits, s_out = self._student_pair(x, training=training)
        hard = self.compiled_loss(y, s_out, regularization_losses=self.student.losses)
        soft = distillation_loss(s_logits, t_logits, self.temperature)
        return {"loss": self.alpha * hard + (1.0 - self.alpha) * soft, "student_loss": hard,
                "distillation_loss": soft}, s_out

    @property
    def metrics(self):
        compiled = self.compiled_metrics.metrics if getattr(self, "compiled_metrics", None) is not None else []
        return [*self._trackers.values(), *compiled]

    def train_step(self, data):
        x, y = data[0], data[1]
        from mobileqat._tf import tf
        with tf.GradientTape() as tape:
            losses, s_out = self.losses_on(x, y, training=True)
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(losses["loss"], variables), variables))
        for name, value in losses.items():
            self._trackers[name].update_state(value)
        self.compiled_metrics.update_state(y, s_out)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data[0], data[1]
        out = self.student(x, training=False)
        hard = self.compiled_loss(y, out, regularization_losses=self.student.losses)
        self._trackers["loss"].update_state(hard)  # evaluation: the student's own loss
        self.compiled_metrics.update_state(y, out)
        return {m.name: m.result() for m in self.metrics if m.name not in ("student_loss", "distillation_loss")}
