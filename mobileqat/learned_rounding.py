"""AdaRound: learned rounding of weights, layer by layer, on calibration images.

    qat = mobileqat.ptq(float_model, x_calib, "w4a8", adaround=True)          # calibrate, then AdaRound
    report = mobileqat.adaround(qat, x_calib, iters=1000)                     # or on a calibrated model

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization". For each layer with weights,
in graph order, with the per-channel step s and integer grid [-t, t] (t = 2^(b-1) - 1) of the layer's
calibrated ``WeightQuantizer`` (the step the exported file carries: b-bit weights are int8 tensors on the b-bit
grid, or packed INT4), a rounding variable V (the shape of the weights) is learned:

    W_q(V) = s * clip(floor(W / s) + h(V), -t, t),   h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
    loss   = mean over images and positions of sum over output channels (f(W x_q + b) - f(W x + b))^2
             + lambda * sum(1 - |2 h(V) - 1|^beta)

zeta = 1.1, gamma = -0.1, lambda = ``reg`` (0.01), beta annealed linearly from 20 to 2 after the first
``warmup`` (20 %) of the ``iters`` Adam steps (no regularization before), one random batch of ``batch_size``
images a step. f is the layer's fused activation; x_q is the layer's input in the quantized model, layers
before it already rounded (sequential), x and the target f(W x + b) come from the float model (every
fake-quant an identity, the original weights): the asymmetric reconstruction of the paper, which also
compensates errors made upstream. V starts where h(V) = W / s - floor(W / s); at the end h is rounded to
{0, 1}, so every integer weight is floor(W / s) or floor(W / s) + 1: at most one step from nearest rounding.

W is the tensor the file carries: for a folded Conv/Depthwise + BatchNormalization the folded kernel
w * gamma / sqrt(var + eps). The result is stored as float weights that the quantizer's nearest rounding (with
its fixed range) maps exactly to the learned integers (for a folded layer: kernel = s q / (gamma / sqrt(var +
eps))); ``adaround`` checks that for every layer, so ``export_tflite`` writes and ``lower`` reproduces those
integers. With ``bias_correction`` each layer's bias then gets E[(W - W_q) x_q] per output channel (as
``calibration.correct_biases`` computes it, with the AdaRounded W_q and the float W).
"""
import time

import numpy as np

from mobileqat._tf import keras, tf

ZETA, GAMMA = 1.1, -0.1


class _Rounded:
    """One layer with weights: its float weight W (output channels last), grid and how to apply / store it."""

    def __init__(self, wrapper, kind):
        from mobileqat.lowering import _fake_quant_bits, _weight_max, quantization_params
        from mobileqat.quantizers import WeightQuantizer
        self.wrapper, self.kind, self.inner = wrapper, kind, wrapper.layer
        self.name = wrapper.name
        where = f"layer '{self.name}' ({type(self.inner).__name__})"
        if kind == "folded":
            self.quantizer, self.qvars = self.inner.weight_quantizer, self.inner._wq_vars
            self.w = self.inner.folded_float_kernel().numpy()
            self.bias_var = self.inner.beta
        else:
            var, self.quantizer, self.qvars = wrapper._weight_vars[0]
            self.var, self.w = var, var.numpy()
            self.bias_var = self.inner.bias if self.inner.use_bias else None
        q = self.quantizer
        if type(q) is not WeightQuantizer:
            raise ValueError(f"{where} quantizes its weights with {type(q).__name__}; AdaRound learns rounding on "
                             "the fixed grid of a calibrated WeightQuantizer: quantize with a min-max scheme "
                             "(e.g. 'w8a8', 'w4a8'), not a learned-step one, and calibrate it.")
        if not q.fixed_range:
            raise ValueError(f"{where}: its weight range is not fixed (WeightQuantizer(fixed_range=False) records "
                             "max|w| again, which would move the grid AdaRound learned on); calibrate first: "
                             "mobileqat.calibrate(qat, data) or mobileqat.ptq(model, data, adaround=True).")
        top_fq = _weight_max(q, self.qvars, where, packed_ok=True)
        bits = _fake_quant_bits(q)
        steps = [quantization_params(-a, a, bits, narrow_range=True)[0] for a in np.atleast_1d(top_fq)]
        self.step = np.asarray(steps if q.per_channel else steps[0], np.float32)
        self.top = 2 ** (q.num_bits - 1) - 1

    def original(self):
        """Variables and values to restore for the float model: kernel (and bias)."""
        out = [(self.inner.kernel if self.kind == "folded" else self.var)]
        if self.bias_var is not None:
            out.append(self.bias_var)
        return [(v, v.numpy()) for v in out]

    def linear(self, x, w):
        """The layer's output without bias and activation for weights w (output channels last)."""
        if self.kind == "folded":
            return self.inner._conv(x, tf.reshape(w, self.inner.kernel.shape))
        if self.kind == "Dense":
            return tf.tensordot(x, w, [[x.shape.rank - 1], [0]])
        return self.inner.convolution_op(x, w)

    def bias(self):
        if self.kind == "folded":
            return self.inner.folded_bias()
        return self.inner.bias if self.bias_var is not None else 0.0

    def output(self, x, w):
        return self.inner.activation(self.linear(x, w) + self.bias())

    def store(self, q):
        """Write integer weights q so that the quantizer maps the stored float weights exactly to q."""
        wq = (q.astype(np.float32) * self.step).astype(np.float32)
        if self.kind == "folded":
            inner = self.inner
            factor = (inner.gamma * tf.math.rsqrt(inner.moving_variance + inner.epsilon)).numpy()
            kernel = np.reshape(inner.kernel.numpy(), inner._quant_shape)
            safe = np.where(factor == 0, np.float32(1), factor)
            kernel = np.where(factor == 0, kernel, wq / safe).astype(np.float32)
            inner.kernel.assign(np.reshape(kernel, inner.kernel.shape))
            got = inner.folded_kernel(training=False).numpy().reshape(self.w.shape)
        else:
            self.var.assign(wq)
            got = self.quantizer(self.var, False, self.qvars).numpy()
        codes = np.round(got.astype(np.float64) / self.step)
        if not np.array_equal(codes, q):
            bad = int(np.sum(codes != q))
            raise RuntimeError(f"layer '{self.name}': {bad} stored AdaRound weights do not quantize back to the "
                               "learned integers; this is a mobileqat bug, please report it.")


def rectified_sigmoid(v):
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) (numpy or TensorFlow)."""
    if isinstance(v, np.ndarray):
        return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def initial_v(rest):
    """V with h(V) = rest (rest in [0, 1): the fractional part of W / s)."""
    p = (np.asarray(rest, np.float64) - GAMMA) / (ZETA - GAMMA)
    return np.log(p / (1.0 - p)).astype(np.float32)


def _learn(layer, xq, target, iters, batch_size, lr, reg, warmup, beta_range, seed):
    """Adam on V (numpy float32 array of W's shape) for ``iters`` steps; returns the learned V."""
    w_s = layer.w.astype(np.float64) / layer.step
    floor = np.floor(w_s).astype(np.float32)
    v = tf.Variable(initial_v(w_s - np.floor(w_s)))
    m, s2 = tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))
    step, top = tf.constant(layer.step), float(layer.top)
    x_all, y_all = tf.constant(xq), tf.constant(target)
    n = int(xq.shape[0])
    idx = tf.constant(np.random.default_rng(seed).integers(0, n, (iters, min(batch_size, n))), tf.int32)
    start_decay = int(warmup * iters)
    b_hi, b_lo = (float(b) for b in beta_range)

    @tf.function
    def run():
        b1, b2, eps = 0.9, 0.999, 1e-8
        for t in tf.range(iters):
            xb, yb = tf.gather(x_all, idx[t]), tf.gather(y_all, idx[t])
            rel = tf.maximum(0.0, tf.cast(t - start_decay, tf.float32) / float(max(1, iters - start_decay)))
            beta = b_lo + (b_hi - b_lo) * (1.0 - rel)
            lam = tf.where(t < start_decay, 0.0, reg)
            with tf.GradientTape() as tape:
                h = rectified_sigmoid(v)
                w = tf.clip_by_value(floor + h, -top, top) * step
                err = layer.output(xb, w) - yb
                rec = tf.reduce_mean(tf.reduce_sum(tf.square(err), axis=-1))
                loss = rec + lam * tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
            g = tape.gradient(loss, v)
            tf1 = tf.cast(t + 1, tf.float32)
            m.assign(b1 * m + (1 - b1) * g)
            s2.assign(b2 * s2 + (1 - b2) * g * g)
            v.assign_sub(lr * (m / (1 - b1 ** tf1)) / (tf.sqrt(s2 / (1 - b2 ** tf1)) + eps))
        return v

    return run().numpy(), floor


def _reconstruction_error(layer, xq, target, q, batch_size=64):
    """mean over images and positions of sum over channels (f(W_q x_q + b) - target)^2 for integer weights q."""
    w = tf.constant((q * layer.step).astype(np.float32))
    total, count = 0.0, 0
    for i in range(0, len(xq), batch_size):
        err = layer.output(tf.constant(xq[i:i + batch_size]), w) - target[i:i + batch_size]
        per = tf.reduce_sum(tf.square(err), axis=-1)
        total += float(tf.reduce_sum(per))
        count += int(tf.size(per))
    return total / count


def nearest(layer):
    """Nearest rounding on the layer's grid (what the quantizer does): clip(floor(W / s + 0.5), -t, t)."""
    return np.clip(np.floor(layer.w.astype(np.float64) / layer.step + 0.5), -layer.top, layer.top)


def adaround(qat, data, iters=1000, batch_size=32, learning_rate=1e-2, reg=0.01, warmup=0.2,
             beta_range=(20.0, 2.0), bias_correction=False, max_images=None, seed=0, verbose=False):
    """Learn the rounding of every weighted layer of a calibrated ``qat`` (module docstring); modifies it in place.

    qat: a model from ``mobileqat.ptq`` / ``mobileqat.quantize`` + ``mobileqat.calibrate`` (fixed weight ranges).
    data: calibration images (N, H, W, C) float32 as the model takes them, or a tf.data.Dataset of such batches
      (or of (images, labels)); ``max_images`` keeps the first ones. iters: Adam steps per layer, each on
      ``batch_size`` random images. reg: lambda; beta_range: (start, end) of the annealed beta. verbose: print
      one line per layer (errors before / after, time).
    Returns {"adaround": {layer: {"weights", "changed" (fraction of integer weights that differ from nearest
    rounding), "mse_nearest", "mse_adaround" (reconstruction error on all the images, nearest vs learned
    rounding), "seconds"}}, "not_rounded": {layer: why}, "bias_correction": {layer: max |correction|}, "seconds"}.
    """
    from mobileqat.calibration import _images, _quantizers, _Tap, _weighted_layers
    if int(iters) < 1:
        raise ValueError(f"adaround: iters={iters!r}; give a positive number of steps per layer (e.g. 1000).")
    if not 0.0 <= float(warmup) < 1.0:
        raise ValueError(f"adaround: warmup={warmup!r}; give the fraction of steps without regularization in [0, 1).")
    x = _images(qat, data)
    if max_images:
        x = x[:int(max_images)]
    t_start = time.time()
    report = {"adaround": {}, "not_rounded": {}, "bias_correction": {}}
    todo = []
    weighted = _weighted_layers(qat)
    covered = {id(w) for w, _ in weighted}
    for layer in qat.layers:  # other layers with fake-quantized weights keep nearest rounding, named
        if id(layer) not in covered and getattr(layer, "_weight_vars", None):
            report["not_rounded"][layer.name] = (f"{type(getattr(layer, 'layer', layer)).__name__}: nearest "
                                                 "rounding (AdaRound covers Conv2D, DepthwiseConv2D and Dense)")
    for wrapper, kind in weighted:
        if kind == "Conv2DTranspose":
            report["not_rounded"][wrapper.name] = "Conv2DTranspose: nearest rounding (AdaRound not done for it yet)"
            continue
        todo.append(_Rounded(wrapper, kind))  # refuses learned-step and uncalibrated weight quantizers
    _quantizers(qat)  # refuses a float model and quantizers whose ranges calibrate could not have set
    if not todo:
        raise ValueError(f"model '{qat.name}' has no Conv2D/DepthwiseConv2D/Dense layer whose rounding AdaRound "
                         "can learn.")
    spec = tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)
    quant_model = keras.Model(qat.input, [r.wrapper.input for r in todo])
    quant_fn = tf.function(lambda t: quant_model(t, training=False)).get_concrete_function(spec)
    float_model = keras.Model(qat.input, [t for r in todo for t in (r.wrapper.input, r.wrapper.output)])
    with _Tap():  # every quantizer an identity: the float model
        float_fn = tf.function(lambda t: float_model(t, training=False)).get_concrete_function(spec)
    originals = [r.original() for r in todo]

    def gather(fn, i, chunk=64):
        outs = []
        for start in range(0, len(x), chunk):
            res = fn(tf.constant(x[start:start + chunk]))
            outs.append((res[i] if isinstance(res, (list, tuple)) else res).numpy())
        return np.concatenate(outs)

    for i, layer in enumerate(todo):
        t0 = time.time()
        rounded = [[(v, v.numpy()) for v, _ in originals[j]] for j in range(i)]
        for j in range(i):
            for v, value in originals[j]:
                v.assign(value)
        target = gather(float_fn, 2 * i + 1)
        for saved in rounded:
            for v, value in saved:
                v.assign(value)
        xq = gather(quant_fn, i)
        v, floor = _learn(layer, xq, target, int(iters), int(batch_size), float(learning_rate), float(reg),
                          float(warmup), beta_range, seed + i)
        q = np.clip(floor + (rectified_sigmoid(v) >= 0.5), -layer.top, layer.top)
        q_near = nearest(layer)
        entry = {"weights": int(q.size), "changed": float(np.mean(q != q_near)),
                 "mse_nearest": _reconstruction_error(layer, xq, target, q_near),
                 "mse_adaround": _reconstruction_error(layer, xq, target, q)}
        if bias_correction:
            if layer.bias_var is None:
                report.setdefault("not_corrected", {})[layer.name] = "no bias (use_bias=False): nothing to correct"
            else:
                dw = tf.constant((layer.w - q * layer.step).astype(np.float32))
                total, count = 0.0, 0
                for start in range(0, len(xq), 64):
                    err = layer.linear(tf.constant(xq[start:start + 64]), dw)
                    err = tf.reshape(err, (-1, err.shape[-1]))
                    total = total + tf.reduce_sum(err, axis=0).numpy().astype(np.float64)
                    count += int(err.shape[0])
                correction = (total / count).astype(np.float32)
                layer.bias_var.assign_add(correction)
                report["bias_correction"][layer.name] = float(np.abs(correction).max())
        layer.store(q)
        entry["seconds"] = round(time.time() - t0, 2)
        report["adaround"][layer.name] = entry
        if verbose:
            print(f"adaround {i + 1}/{len(todo)} {layer.name}: mse {entry['mse_nearest']:.4g} -> "
                  f"{entry['mse_adaround']:.4g}, {100 * entry['changed']:.1f} % changed, {entry['seconds']} s",
                  flush=True)
    report["seconds"] = round(time.time() - t_start, 1)
    return report
