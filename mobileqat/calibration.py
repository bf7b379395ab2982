"""Post-training quantization through mobileqat's own path: choose every quantizer's range from data.

    qat = mobileqat.ptq(float_model, x_calib, "w4a8", method="mse", bias_correction=True)
    mobileqat.export_tflite(qat, "model.tflite")     # the same export as QAT
    mobileqat.lower(qat)                             # the same integer twin, 0 LSB

``ptq`` = ``quantize`` (rewrites, BatchNorm folding, the scheme's quantizers) + ``calibrate`` instead of
training. ``calibrate`` runs the *float twin* of the QAT model (every fake-quant an identity: the folded float
model) over the calibration images and records, per activation quantizer, the tensor it quantizes, and per
weight quantizer the (folded) weights; a range method then sets the quantizer's variables:

- ``minmax``: [min, max] of the tensor (activations), max|w| per output channel (weights);
- ``percentile``: the ``percentile``-th and (100 - ``percentile``)-th percentiles (activations), the
  ``percentile``-th percentile of |w| per channel (weights);
- ``mse``: the range alpha * minmax, alpha on a grid of ``grid`` values in (0, 1], that minimizes the mean
  squared error between the tensor and its quantized values (per channel for weights, on the scheme's n-bit
  grid; per tensor for activations on TensorFlow's nudged 8-bit grid).

Ranges always contain 0. Weight quantizers get ``fixed_range=True``: a later fine-tune keeps the calibrated
(possibly clipping) range. Activation ranges go into the EMA variables, marked as seen, so fine-tuning
continues from them. Statistics use at most ``max_samples`` values per activation tensor (an even random
subsample per batch, seeded); min and max are exact.

Bias correction (Nagel et al. 2019, "Data-Free Quantization", empirical form): for each layer with weights, in
graph order, the bias gets E[W x] - E[Q(W) x] per output channel, the mean over calibration images and positions,
where x is the layer's input in the quantized model (earlier layers already corrected), so that the layer's mean
output matches the float weights'.
"""
import numpy as np

from mobileqat._tf import keras, tf, tfmot
from mobileqat.quantizers import ActivationQuantizer, FixedRangeQuantizer, WeightQuantizer

METHODS = ("minmax", "percentile", "mse")
_AllValues = tfmot.quantization.keras.quantizers.AllValuesQuantizer  # tfmot's input quantizer


def _check_method(method, what="method"):
    if method not in METHODS:
        raise ValueError(f"{what}={method!r} is not a calibration method; use one of {METHODS}.")
    return method


# --- range methods on numpy arrays -------------------------------------------------------------------

def fake_quant_np(x, lo, hi, num_bits=8):
    """TensorFlow's FakeQuantWithMinMaxVars (asymmetric, nudged zero point) in numpy (float64)."""
    x = np.asarray(x, np.float64)
    qmax = 2 ** num_bits - 1
    scale = (float(hi) - float(lo)) / qmax
    if scale <= 0:
        return np.zeros_like(x)
    zp = np.clip(np.floor(-float(lo) / scale + 0.5), 0, qmax)
    nlo, nhi = -zp * scale, (qmax - zp) * scale
    return np.floor((np.clip(x, nlo, nhi) - nlo) / scale + 0.5) * scale + nlo


def symmetric_quant_np(w, amax, num_bits=8):
    """Weights (..., C) on the narrow symmetric ``num_bits`` grid over [-amax, amax] (amax scalar or (C,)),
    step amax / (2^(num_bits-1) - 1), as ``WeightQuantizer`` quantizes them (float64)."""
    top = 2 ** (num_bits - 1) - 1
    step = np.maximum(np.asarray(amax, np.float64), 1e-12) / top
    return np.clip(np.floor(np.abs(w) / step + 0.5), 0, top) * np.sign(w) * step


def activation_range(x, method="minmax", percentile=99.99, num_bits=8, grid=100):
    """(lo, hi) float32, lo <= 0 <= hi, for an activation tensor's values ``x`` (any shape)."""
    _check_method(method)
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        raise ValueError("activation_range: no values to calibrate on.")
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if method == "percentile":
        _check_percentile(percentile)
        lo = min(float(np.percentile(x, 100.0 - percentile)), 0.0)
        hi = max(float(np.percentile(x, percentile)), 0.0)
    elif method == "mse" and hi > lo:
        errors = [np.mean((fake_quant_np(x, a * lo, a * hi, num_bits) - x) ** 2) for a in _alphas(grid)]
        a = _alphas(grid)[int(np.argmin(errors))]
        lo, hi = a * lo, a * hi
    return np.float32(lo), np.float32(hi)


def weight_range(w, method="minmax", num_bits=8, per_channel=True, percentile=99.99, grid=100):
    """The symmetric range amax of weights ``w`` (..., C): (C,) float32 per output channel (last axis), or a
    float32 scalar per tensor. Floored at 1e-8 (a zero scale cannot be prepared by TFLite)."""
    _check_method(method)
    w = np.asarray(w, np.float64)
    a = np.abs(w.reshape(-1, w.shape[-1]) if per_channel else w.reshape(-1, 1))
    if method == "minmax":
        amax = a.max(axis=0)
    elif method == "percentile":
        _check_percentile(percentile)
        amax = np.percentile(a, percentile, axis=0)
    else:
        top = a.max(axis=0)
        signed = w.reshape(a.shape)
        errors = np.stack([np.mean((symmetric_quant_np(signed, al * top, num_bits) - signed) ** 2, axis=0)
                           for al in _alphas(grid)])
        amax = _alphas(grid)[np.argmin(errors, axis=0)] * top
    amax = np.maximum(amax, 1e-8).astype(np.float32)
    return amax if per_channel else amax[0]


def _alphas(grid):
    return np.arange(1, int(grid) + 1, dtype=np.float64) / int(grid)


def _check_percentile(p):
    if not 50.0 < float(p) <= 100.0:
        raise ValueError(f"percentile={p!r}: use a value in (50, 100], e.g. 99.99.")


# --- statistics of a QAT model ------------------------------------------------------------------------

def _images(model, data):
    """Calibration images as float32 (N, H, W, C), checked against the model's input."""
    if hasattr(data, "element_spec"):  # a tf.data.Dataset of images or (images, labels) batches
        parts = [np.asarray(b[0] if isinstance(b, (tuple, list)) else b) for b in data.as_numpy_iterator()]
        data = np.concatenate(parts) if parts else np.zeros((0,) + tuple(model.input_shape[1:]), np.float32)
    x = np.asarray(data, np.float32)
    expected = tuple(model.input_shape[1:])
    if x.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(f"calibration data of shape {x.shape} does not fit the input of model '{model.name}' "
                         f"(None, {', '.join(str(e) for e in expected)}); give images (N, "
                         f"{', '.join(str(e) for e in expected)}) scaled as in training.")
    if len(x) == 0:
        raise ValueError(f"the calibration set for model '{model.name}' is empty; give at least one image "
                         "(a few hundred from the training split is typical: mobileqat.calibration_subset).")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the calibration data for model '{model.name}' holds NaN or infinite values; "
                         "give finite images scaled as in training.")
    return x


class _Tap:
    """During tracing, replace every quantizer's __call__ by an identity that records what it sees."""

    KINDS = {WeightQuantizer: "weight", ActivationQuantizer: "activation", _AllValues: "activation",
             FixedRangeQuantizer: None}

    def __init__(self):
        self.records, self._saved = [], {}

    def __enter__(self):
        for cls, kind in self.KINDS.items():
            self._saved[cls] = cls.__call__

            def call(q, inputs, training, weights, _kind=kind, **kwargs):
                if _kind is not None:
                    self.records.append((_kind, q, weights, inputs))
                return inputs
            cls.__call__ = call
        return self

    def __exit__(self, *exc):
        for cls, fn in self._saved.items():
            cls.__call__ = fn


def _quantizers(model):
    """(layer name, quantizer) of every quantizer in a QAT model; raises on quantizers calibrate cannot set."""
    found = []
    for layer in model.layers:
        qs = []
        if hasattr(layer, "quantizer") and layer.quantizer is not None:
            qs.append(layer.quantizer)
        config = getattr(layer, "quantize_config", None)
        qs += [getattr(config, a, None) for a in ("weight_quantizer", "output_quantizer")]
        qs.append(getattr(getattr(layer, "layer", None), "weight_quantizer", None))
        for q in qs:
            if q is not None and type(q) not in _Tap.KINDS:
                raise ValueError(f"layer '{layer.name}' uses {type(q).__name__}, whose range calibrate cannot set; "
                                 "calibrate models from mobileqat.quantize with the default quantizers "
                                 f"({', '.join(sorted(c.__name__ for c in _Tap.KINDS))}).")
            if q is not None:
                found.append((layer.name, q))
    if not found:
        raise ValueError(f"model '{model.name}' has no quantizers; give the float model to mobileqat.ptq, or a "
                         "model from mobileqat.quantize to calibrate.")
    return found


def collect_statistics(qat, data, batch_size=64, max_samples=2 ** 18, seed=0):
    """Run the float twin of ``qat`` over ``data`` and return its tensors, in trace order:
    [{"kind": "weight" | "activation", "quantizer", "variables" (dict), "values" (weights: the float
    tensor; activations: at most ``max_samples`` values, float32 1-D), "min", "max" (exact)}]."""
    x = _images(qat, data)
    _quantizers(qat)
    batch_size = max(1, int(batch_size))
    spec = tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)
    with _Tap() as tap:
        def taps(t):
            qat(t, training=False)
            return [r[3] for r in tap.records]
        concrete = tf.function(taps).get_concrete_function(spec)
    records, seen = [], set()
    for i, (kind, q, weights, _) in enumerate(tap.records):
        key = id(next(iter(weights.values())))
        if key in seen:  # both branches of a smart_cond traced
            continue
        seen.add(key)
        records.append({"index": i, "kind": kind, "quantizer": q, "variables": weights, "chunks": [],
                        "min": np.inf, "max": -np.inf})
    n_batches = -(-len(x) // batch_size)
    per_batch = -(-int(max_samples) // n_batches)
    rng = np.random.default_rng(seed)
    for start in range(0, len(x), batch_size):
        outs = concrete(tf.constant(x[start:start + batch_size]))
        for r in records:
            v = outs[r["index"]].numpy()
            if r["kind"] == "weight":
                if not r["chunks"]:
                    r["chunks"].append(v)
                continue
            v = v.ravel()
            r["min"], r["max"] = min(r["min"], float(v.min())), max(r["max"], float(v.max()))
            r["chunks"].append(v if v.size <= per_batch else rng.choice(v, per_batch, replace=False))
    for r in records:
        r["values"] = r["chunks"][0] if r["kind"] == "weight" else np.concatenate(r.pop("chunks"))
        r.pop("chunks", None)
        if r["kind"] == "weight":
            r["min"], r["max"] = float(r["values"].min()), float(r["values"].max())
    return records


# --- calibrate / ptq ----------------------------------------------------------------------------------

def calibrate(qat, data, method="minmax", weight_method=None, percentile=99.99, bias_correction=False,
              batch_size=64, max_samples=2 ** 18, grid=100, seed=0):
    """Set every quantizer range of ``qat`` (a model from ``mobileqat.quantize``) from calibration images.

    data: float32 images (N, H, W, C) as the model takes them (or a tf.data.Dataset of such batches, or of
      (images, labels)). method: range method for activations, one of ``METHODS``; weight_method: for
      weights (default: ``method``). percentile: for "percentile" (e.g. 99.99). grid: candidates of "mse".
    bias_correction: correct each layer's bias by E[W x] - E[Q(W) x] (module docstring).
    Modifies ``qat`` in place and returns a report: {"method", "weight_method", "activations": {variable
    name: [lo, hi]}, "weights": {variable name: amax list}, "bias_correction": {layer: max |correction|},
    "not_corrected": {layer: why}}.
    """
    _check_method(method)
    weight_method = _check_method(weight_method or method, "weight_method")
    records = collect_statistics(qat, data, batch_size, max_samples, seed)
    report = {"method": method, "weight_method": weight_method, "activations": {}, "weights": {}}
    owner = {v.ref(): layer.name for layer in qat.layers for v in layer.weights}
    for r in records:
        q, v = r["quantizer"], r["variables"]
        if r["kind"] == "weight":
            amax = weight_range(r["values"], weight_method, q.num_bits, q.per_channel, percentile, grid)
            v["max_var"].assign(np.reshape(amax, v["max_var"].shape))
            q.fixed_range = True
            report["weights"][owner.get(v["max_var"].ref(), _name(v["max_var"]))] = np.atleast_1d(amax).tolist()
        else:
            lo, hi = activation_range(r["values"], method, percentile, q.num_bits, grid)
            if method == "minmax":  # the exact extremes, not the subsample's
                lo, hi = np.float32(min(r["min"], 0.0)), np.float32(max(r["max"], 0.0))
            v["min_var"].assign(lo)
            v["max_var"].assign(hi)
            if "seen_var" in v:
                v["seen_var"].assign(1.0)
            report["activations"][owner.get(v["min_var"].ref(), _name(v["min_var"]))] = [float(lo), float(hi)]
    if bias_correction:
        report.update(correct_biases(qat, _images(qat, data), batch_size))
    return report


def _name(var):
    return var.name.rsplit(":", 1)[0]


def _weighted_layers(qat):
    """(wrapper, kind) of the layers whose bias can absorb a weight error, in graph order."""
    from mobileqat.layers import FoldedConvBN
    out = []
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        if isinstance(inner, FoldedConvBN) and inner.weight_quantizer is not None:
            out.append((layer, "folded"))
        elif type(inner) in (keras.layers.Dense, keras.layers.Conv2D, keras.layers.Conv2DTranspose) \
                and getattr(layer, "_weight_vars", None):
            out.append((layer, type(inner).__name__))
    return out


def _weight_error_output(wrapper, kind, x):
    """The layer's linear output for the weight error W - Q(W) on input x: (..., C_out) float32."""
    inner = wrapper.layer
    if kind == "folded":
        dw = (tf.reshape(inner.folded_float_kernel(), inner.kernel.shape) - inner.folded_kernel(training=False))
        return inner._conv(x, dw)
    var, quantizer, qvars = wrapper._weight_vars[0]
    dw = var - quantizer(var, False, qvars)
    if kind == "Dense":
        return tf.tensordot(x, dw, [[x.shape.rank - 1], [0]])
    return inner.convolution_op(x, dw)


def correct_biases(qat, x, batch_size=64):
    """Empirical bias correction of every weighted layer of a calibrated ``qat``, in graph order, on images
    ``x`` (N, H, W, C): bias += mean over images and positions of (W - Q(W)) applied to the layer's input in
    the quantized model. Returns {"bias_correction": {layer: max |correction|}, "not_corrected": {layer: why}}."""
    layers = _weighted_layers(qat)
    done, skipped = {}, {}
    if not layers:
        return {"bias_correction": done, "not_corrected": skipped}
    features = keras.Model(qat.input, [w.input for w, _ in layers])
    run = tf.function(lambda t: features(t, training=False))
    for i, (wrapper, kind) in enumerate(layers):
        inner = wrapper.layer
        if kind == "Conv2DTranspose":
            skipped[wrapper.name] = "Conv2DTranspose: no bias correction yet"
            continue
        if kind != "folded" and not inner.use_bias:
            skipped[wrapper.name] = f"{kind} without a bias (use_bias=False): nothing to correct"
            continue
        total, count = 0.0, 0
        for start in range(0, len(x), batch_size):
            inputs = run(tf.constant(x[start:start + batch_size]))
            inputs = inputs[i] if isinstance(inputs, (list, tuple)) else inputs
            err = _weight_error_output(wrapper, kind, inputs)
            err = tf.reshape(err, (-1, err.shape[-1]))
            total = total + tf.reduce_sum(err, axis=0).numpy().astype(np.float64)
            count += int(err.shape[0])
        correction = (total / count).astype(np.float32)
        (inner.beta if kind == "folded" else inner.bias).assign_add(correction)
        done[wrapper.name] = float(np.abs(correction).max())
    return {"bias_correction": done, "not_corrected": skipped}


def ptq(model, calibration_data, scheme="w8a8", method="minmax", bias_correction=False, weight_method=None,
        percentile=99.99, batch_size=64, max_samples=2 ** 18, grid=100, seed=0, keep_float=(), adaround=False,
        adaround_iters=1000, adaround_options=None):
    """Post-training quantization through mobileqat's own path; returns a QAT-style Keras model.

    model: the trained float Keras model (one image input (None, H, W, C), as for ``quantize``).
    calibration_data: float32 images (N, H, W, C) scaled as in training (a few hundred is typical;
      ``mobileqat.calibration_subset``), or a tf.data.Dataset of image (or (image, label)) batches.
    scheme: "w8a8", "w4a8", a ``QuantScheme`` or mixed-precision rules, as ``quantize`` takes.
    method: "minmax" | "percentile" | "mse" (module docstring); weight_method: for weights (default: method).
    bias_correction: empirical bias correction after weight quantization.
    adaround: learn the rounding of every weighted layer after calibration (``mobileqat.adaround``,
      ``adaround_iters`` Adam steps per layer; ``adaround_options``: its other keyword arguments); bias
      correction, if asked, then follows each layer's learned rounding.
    The result is ``quantize(model, scheme)`` with calibrated ranges instead of trained ones: export it with
    ``export_tflite`` and lower it with ``lower`` as a QAT model (0 LSB on both runtimes); it can still be
    fine-tuned with ``fit`` (weight ranges stay fixed). ``calibrate`` does the same on a quantized model and
    returns the ranges it chose.
    """
    from mobileqat.quantize import quantize
    _check_method(method)
    _check_method(weight_method or method, "weight_method")
    _images(model, calibration_data)  # shape / emptiness errors before the rewrites
    if adaround_options is not None and not isinstance(adaround_options, dict):
        raise ValueError(f"adaround_options={adaround_options!r}: give a dict of mobileqat.adaround keyword "
                         "arguments, e.g. {'batch_size': 32}.")
    qat = quantize(model, scheme, keep_float=keep_float)
    calibrate(qat, calibration_data, method, weight_method, percentile, bias_correction and not adaround,
              batch_size, max_samples, grid, seed)
    if adaround:
        from mobileqat.learned_rounding import adaround as learn_rounding
        options = {"seed": seed, **(adaround_options or {})}
        learn_rounding(qat, calibration_data, iters=adaround_iters, bias_correction=bias_correction, **options)
    return qat
