"""Per-layer sensitivity to a lower precision, and a mixed-precision plan under an accuracy budget.

    run = mobileqat.SensitivityRun(float_model, x_calib, x_eval, y_eval, high="w8a8", low="w4a8")
    sens = mobileqat.layer_sensitivity(run)               # one row per layer with weights
    plan = mobileqat.mixed_precision_plan(sens, 0.5, run) # rules: quantize(model, plan["rules"])
    mobileqat.plot_sensitivity(sens, "sensitivity.png", plan)

Everything is measured on the **integer twin** (``mobileqat.lower``: the int8 file's arithmetic, bit for bit, on
``runtime``), never on the float simulation, and without writing a .tflite per layer:

- the *baseline* is ``ptq(model, calibration_data, high)``: every layer at the high scheme;
- for each layer with weights (the layers scheme rules choose, ``quantize.scheme_plan``), the *variant* is the
  model with that layer alone at the low scheme, i.e. ``ptq(model, calibration_data, rules)`` with
  ``rules = {"default": high, "rules": [{"match": {"name": layer}, "scheme": low}]}``;
- per variant: accuracy on (x, y) and its change in points against the baseline; the output codes' change
  against the baseline's (mean |delta code| in output LSB, and the fraction of images whose top-1 class
  changes); the bytes the layer's weights save at the low bit width (weights x bit difference / 8, what a
  packed store saves; ``file_bytes_saved``: what the .tflite itself saves, only packed INT4 Dense weights).

Calibration statistics are reused where that is exact: ``calibrate`` takes activation ranges from the float
model (every fake quantizer an identity), so they do not depend on any layer's weight bits, and a min-max
weight range (max|w| per channel) does not depend on the bit width either. So when the two schemes differ
only in weight bits (and packed INT4), with ``method="minmax"`` and no bias correction, a variant is the
calibrated baseline with that one layer's weight quantizer switched to the low bit width: the same ranges,
codes identical to the re-quantized, re-calibrated model (tested layer by layer). Otherwise (other range
methods, bias correction, schemes that differ in activations or quantizer kind) every variant is quantized
and calibrated from scratch (``ptq``): slower, same definition.

The plan (``mixed_precision_plan``) picks layers greedily by bytes saved per point of predicted drop (the sum of
the chosen layers' own drops, negative drops counted as 0, each at least one image's worth so that layers that
cost nothing are taken biggest first), then measures the combined plan on the twin (the real ``ptq`` with the
plan's rules) and, while the measured drop exceeds the budget, moves the most sensitive chosen layer back to the
high scheme. The budget is in accuracy points (percent) below the all-high baseline.
"""
import contextlib
import glob
import json
import os

import numpy as np


def _scheme_source(scheme):
    """A scheme as JSON data (preset name or QuantScheme fields)."""
    from mobileqat.schemes import QuantScheme, SchemeRules, get_scheme
    if isinstance(scheme, SchemeRules):
        raise ValueError("high/low must each be one scheme (a preset name such as 'w8a8', a dict of QuantScheme "
                         "fields or a QuantScheme), not rules: the sensitivity run writes the rules.")
    if isinstance(scheme, QuantScheme):
        return scheme.to_dict()
    get_scheme(scheme)  # unknown presets and fields stop here
    return scheme


def single_layer_rules(high, low, layer):
    """Rules (plain data) putting ``layer`` alone at ``low``, every other layer at ``high``."""
    return plan_rules(high, low, [layer])


def plan_rules(high, low, layers):
    """Rules (plain data, as ``quantize``/``ptq`` and ``parse_rules`` take them): ``layers`` at ``low``,
    the others at ``high``. Names are matched exactly (glob characters escaped)."""
    rules = {"default": _scheme_source(high), "rules": []}
    if layers:
        names = [glob.escape(n) for n in layers]
        rules["rules"].append({"match": {"name": names[0] if len(names) == 1 else names},
                               "scheme": _scheme_source(low)})
    return rules


def _weight_quantizers(qat):
    """{layer name: (weight quantizer, inner layer)} of a QAT model's layers whose weights are quantized."""
    from mobileqat.layers import FoldedConvBN
    out = {}
    for layer in qat.layers:
        inner = getattr(layer, "layer", None)
        if isinstance(inner, FoldedConvBN) and inner.weight_quantizer is not None:
            out[inner.name] = (inner.weight_quantizer, inner)
        elif inner is not None and getattr(layer, "_weight_vars", None):
            out[inner.name] = (layer._weight_vars[0][1], inner)
    return out


def _weight_count(inner):
    return int(np.prod(inner.kernel.shape))


def _scheme_weight_quantizer(scheme, inner):
    """The weight quantizer ``quantize`` gives ``inner`` (a layer of the folded model) under ``scheme``."""
    from mobileqat._tf import keras
    if type(inner) is keras.layers.Dense:
        return scheme.fully_connected_weight_quantizer(int(inner.kernel.shape[0]))
    if type(inner) is keras.layers.Conv2DTranspose:
        return scheme.dense_weight_quantizer()
    return scheme.weight_quantizer()


_SWAPPED = ("num_bits", "packed_int4")  # what differs between two schemes' WeightQuantizers the fast path swaps
_ACTIVATION_FIELDS = ("activation_bits", "activation_method", "ema_decay", "pact_l2")


class SensitivityRun:
    """The data and schemes of a sensitivity measurement, with the all-high baseline built once.

    model: the trained float Keras model. calibration_data: images (N, H, W, C) as ``ptq`` takes them.
    x, y: evaluation images (M, H, W, C) float32 scaled as in training, labels (M,) int.
    high, low: schemes (preset name, dict of QuantScheme fields or QuantScheme), e.g. "w8a8" and "w4a8".
    method, bias_correction: calibration, as ``ptq``. runtime: "xnnpack" or "reference" (the twin's arithmetic).
    ``measure(names)`` gives the accuracy and code change of the model with ``names`` at the low scheme.
    """

    def __init__(self, model, calibration_data, x, y, high="w8a8", low="w4a8", method="minmax",
                 bias_correction=False, runtime="xnnpack", batch_size=64, log=None):
        from mobileqat.calibration import _check_method, ptq
        from mobileqat.lowering import RUNTIMES
        from mobileqat.quantize import scheme_plan
        from mobileqat.schemes import get_scheme
        self.high_source, self.low_source = _scheme_source(high), _scheme_source(low)
        self.high, self.low = get_scheme(high), get_scheme(low)
        if self.low.weight_bits >= self.high.weight_bits:
            raise ValueError(f"low scheme {self.low.name!r} has {self.low.weight_bits}-bit weights, high scheme "
                             f"{self.high.name!r} {self.high.weight_bits}-bit: the low scheme must have fewer weight "
                             "bits (e.g. high 'w8a8', low 'w4a8').")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: the integer twin runs {list(RUNTIMES)}; use one of them.")
        _check_method(method)
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y).astype(np.int64).reshape(-1)
        if len(self.x) == 0 or len(self.x) != len(self.y):
            raise ValueError(f"evaluation data: {len(self.x)} images and {len(self.y)} labels; give as many labels "
                             "as images, at least one (the held-out test split).")
        self.model, self.calibration_data = model, calibration_data
        self.method, self.bias_correction, self.runtime, self.batch_size = method, bias_correction, runtime, batch_size
        self.log = log or (lambda msg: None)
        plan = scheme_plan(model, self.high)
        self.layers = [(n, p["class"]) for n, p in plan.items() if not p.get("added_by_rewrite")]
        if not self.layers:
            raise ValueError(f"model '{model.name}' has no layers with weights that a scheme quantizes (Conv2D, "
                             "DepthwiseConv2D, SeparableConv2D, Dense, Conv2DTranspose): nothing to put at a lower "
                             "precision.")
        self.baseline = ptq(model, calibration_data, self.high, method=method, bias_correction=bias_correction)
        self.quantizers = _weight_quantizers(self.baseline)
        missing = [n for n, _ in self.layers if n not in self.quantizers]
        if missing:
            raise ValueError(f"layers {missing} have no weight quantizer in the quantized model; report this as a "
                             "mobileqat bug.")
        self.fast = self._fast_reason() is None
        self.base_codes = self._codes(self.baseline)
        self.base_accuracy = self._accuracy(self.base_codes)

    def _fast_reason(self):
        """None when a variant can be the baseline with one weight quantizer switched (module docstring)."""
        if self.method != "minmax" or self.bias_correction:
            return f"method={self.method!r}, bias_correction={self.bias_correction}: ranges depend on the bits"
        if any(getattr(self.high, f) != getattr(self.low, f) for f in _ACTIVATION_FIELDS + ("per_channel",)):
            return "the schemes differ in more than their weight bits"
        for name, _ in self.layers:
            q, inner = self.quantizers[name]
            new = _scheme_weight_quantizer(self.low, inner)
            if type(new) is not type(q) or not all(hasattr(q, a) for a in _SWAPPED):
                return f"layer '{name}': {type(q).__name__} -> {type(new).__name__}"
            strip = lambda c: {k: v for k, v in c.items() if k not in _SWAPPED + ("fixed_range",)}  # noqa: E731
            if strip(new.get_config()) != strip(q.get_config()):
                return f"layer '{name}': quantizer configs differ beyond the bit width"
        return None

    @property
    def reuse(self):
        """How variants are built, for reports."""
        why = self._fast_reason()
        if why is None:
            return ("baseline calibration reused: activation ranges (from the float model) and min-max weight "
                    "ranges do not depend on the weight bits; each variant switches one layer's weight quantizer "
                    "to the low bit width")
        return f"every variant quantized and calibrated from scratch ({why})"

    def _codes(self, qat):
        from mobileqat.lowering import lower
        twin = lower(qat)
        return np.concatenate([twin.run(twin.quantize_input(self.x[i:i + self.batch_size]), self.runtime)
                               for i in range(0, len(self.x), self.batch_size)])

    def _accuracy(self, codes):
        return float(np.mean(np.argmax(codes.reshape(len(codes), -1), -1) == self.y))

    @contextlib.contextmanager
    def _switched(self, names):
        saved = []
        try:
            for name in names:
                q, inner = self.quantizers[name]
                new = _scheme_weight_quantizer(self.low, inner)
                saved.append((q, {a: getattr(q, a) for a in _SWAPPED}))
                for a in _SWAPPED:
                    setattr(q, a, getattr(new, a))
            yield self.baseline
        finally:
            for q, attrs in saved:
                for a, v in attrs.items():
                    setattr(q, a, v)

    def variant_codes(self, names, exact=False):
        """Output codes (M, classes) of the model with ``names`` at the low scheme. exact: always
        ``ptq`` with the rules, even where the fast path applies."""
        unknown = sorted(set(names) - {n for n, _ in self.layers})
        if unknown:
            raise ValueError(f"layers {unknown} are not layers with weights of model '{self.model.name}'; "
                             f"use names from {[n for n, _ in self.layers][:6]}...")
        if self.fast and not exact:
            with self._switched(names) as qat:
                return self._codes(qat)
        from mobileqat.calibration import ptq
        qat = ptq(self.model, self.calibration_data, plan_rules(self.high_source, self.low_source, names),
                  method=self.method, bias_correction=self.bias_correction)
        return self._codes(qat)

    def measure(self, names, exact=False):
        """{"accuracy", "drop_points" (baseline - variant, in points), "mean_abs_code_change" (output LSB,
        mean over images and outputs), "top1_changed" (fraction of images)} of ``names`` at the low scheme."""
        codes = self.variant_codes(names, exact)
        acc = self._accuracy(codes)
        flat, base = codes.reshape(len(codes), -1), self.base_codes.reshape(len(codes), -1)
        return {"accuracy": acc, "drop_points": round(100.0 * (self.base_accuracy - acc), 6),
                "mean_abs_code_change": float(np.mean(np.abs(flat.astype(np.int32) - base.astype(np.int32)))),
                "top1_changed": float(np.mean(np.argmax(flat, -1) != np.argmax(base, -1)))}

    def bytes_saved(self, name):
        """(weights, bytes a packed store saves, bytes the .tflite saves) of ``name`` at the low scheme."""
        q, inner = self.quantizers[name]
        count = _weight_count(inner)
        low = _scheme_weight_quantizer(self.low, inner)
        high = _scheme_weight_quantizer(self.high, inner)
        packed = count * (high.num_bits - low.num_bits) // 8
        file_bytes = lambda w: count // 2 if getattr(w, "packed_int4", False) else count  # noqa: E731
        return count, packed, file_bytes(high) - file_bytes(low)


def layer_sensitivity(run, layers=None):
    """Measure every layer with weights of ``run`` (a ``SensitivityRun``) alone at the low scheme.

    layers: names to measure (default: all, in graph order). Returns plain data (JSON-serializable):
    {"high", "low", "runtime", "method", "bias_correction", "reuse", "images", "baseline": {"accuracy"},
    "layers": [{"name", "class", "weights", "bytes_saved", "file_bytes_saved", "accuracy", "drop_points",
    "mean_abs_code_change", "top1_changed"}]}; accuracies are fractions, drops in points (percent).
    """
    known = dict(run.layers)
    names = [n for n, _ in run.layers] if layers is None else list(layers)
    rows = []
    for i, name in enumerate(names):
        if name not in known:
            raise ValueError(f"layer '{name}' is not a layer with weights of model '{run.model.name}'; use names "
                             f"from {list(known)[:6]}...")
        count, packed, in_file = run.bytes_saved(name)
        row = {"name": name, "class": known[name], "weights": count, "bytes_saved": packed,
               "file_bytes_saved": in_file, **run.measure([name])}
        rows.append(row)
        run.log(f"[{i + 1}/{len(names)}] {name}: {row['drop_points']:+.2f} points, "
                f"top-1 changed {100 * row['top1_changed']:.1f} %, saves {packed} bytes")
    return {"high": run.high_source, "low": run.low_source, "runtime": run.runtime, "method": run.method,
            "bias_correction": run.bias_correction, "reuse": run.reuse, "images": int(len(run.x)),
            "baseline": {"accuracy": run.base_accuracy}, "layers": rows}


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget={budget!r}: the accuracy budget is a number of points (percent) the plan may lose "
                         "against the all-high baseline, >= 0 (e.g. 0.5).")
    return float(budget)


def _cost(row, resolution):
    """Predicted points a layer costs: its own drop, at least ``resolution`` (one image) for the ranking."""
    return max(row["drop_points"], 0.0) + resolution


def mixed_precision_plan(sensitivities, budget, run=None):
    """The layers to put at the low scheme so that the model is smallest while its accuracy drop against the
    all-high baseline stays within ``budget`` points.

    sensitivities: ``layer_sensitivity``'s result. run: the ``SensitivityRun`` it came from; with it the
    combined plan is measured on the twin (``ptq`` with the plan's rules) and the most sensitive chosen layer is
    moved back to the high scheme until the measured drop meets the budget. Without it the plan is the
    prediction only ("verified": False).
    Returns {"budget_points", "rules" (plain data for quantize/ptq/parse_rules), "low_layers", "bytes_saved",
    "predicted_drop_points", "backed_off" (layers moved back), "measured" (run.measure of the plan, or None),
    "verified"}.
    """
    budget = _check_budget(budget)
    rows = sensitivities["layers"]
    if not rows:
        raise ValueError("the sensitivity result has no layers: nothing to plan.")
    resolution = 100.0 / max(1, int(sensitivities.get("images", 1)))
    saving = [r for r in rows if r["bytes_saved"] > 0]
    order = sorted(saving, key=lambda r: (-r["bytes_saved"] / _cost(r, resolution), r["mean_abs_code_change"],
                                          r["name"]))
    chosen, predicted = [], 0.0
    for r in order:  # knapsack-greedy: skip a layer that does not fit, try the next
        if predicted + max(r["drop_points"], 0.0) <= budget + 1e-9:
            chosen.append(r)
            predicted += max(r["drop_points"], 0.0)
    backed_off, measured = [], None
    if run is not None:
        by_sensitivity = lambda r: (_cost(r, resolution), r["mean_abs_code_change"], r["top1_changed"])  # noqa: E731
        exact = not run.fast  # the fast variants first; the plan as a user gets it (ptq with its rules) last
        while True:
            measured = run.measure([r["name"] for r in chosen], exact=exact)
            if measured["drop_points"] <= budget + 1e-9 or not chosen:
                if exact:
                    break
                exact = True
                continue
            worst = max(chosen, key=by_sensitivity)
            chosen.remove(worst)
            backed_off.append(worst["name"])
            run.log(f"plan: measured drop {measured['drop_points']:.2f} > budget {budget}: "
                    f"{worst['name']} back to the high scheme")
    graph = [r["name"] for r in rows]
    names = sorted((r["name"] for r in chosen), key=graph.index)
    return {"budget_points": budget,
            "rules": plan_rules(sensitivities["high"], sensitivities["low"], names),
            "low_layers": names, "bytes_saved": int(sum(r["bytes_saved"] for r in chosen)),
            "file_bytes_saved": int(sum(r["file_bytes_saved"] for r in chosen)),
            "predicted_drop_points": round(sum(max(r["drop_points"], 0.0) for r in chosen), 6),
            "backed_off": backed_off, "measured": measured, "verified": measured is not None}


def format_table(sensitivities, plan=None, top=None):
    """A per-layer text table, most sensitive first (drop, then mean |delta code|); ``top`` rows at most."""
    chosen = set(plan["low_layers"]) if plan else set()
    rows = sorted(sensitivities["layers"], key=lambda r: (-r["drop_points"], -r["mean_abs_code_change"]))
    rows = rows[:top] if top else rows
    width = max([5] + [len(r["name"]) for r in rows])
    lines = [f"baseline ({_label(sensitivities['high'])}, all layers): accuracy "
             f"{100 * sensitivities['baseline']['accuracy']:.2f} % on {sensitivities['images']} images "
             f"({sensitivities['runtime']} integer twin); one layer at {_label(sensitivities['low'])}:",
             f"{'layer':<{width}}  {'class':<16} {'weights':>8} {'saves B':>8} {'acc %':>7} {'drop pt':>8} "
             f"{'mean|dq|':>8} {'top1 chg %':>10}" + ("  plan" if plan else "")]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['class']:<16} {r['weights']:>8} {r['bytes_saved']:>8} "
                     f"{100 * r['accuracy']:>7.2f} {r['drop_points']:>+8.2f} {r['mean_abs_code_change']:>8.3f} "
                     f"{100 * r['top1_changed']:>10.1f}" + (("  low" if r["name"] in chosen else "") if plan else ""))
    if plan:
        m = plan["measured"]
        lines.append(f"plan (budget {plan['budget_points']} points): {len(plan['low_layers'])} of "
                     f"{len(sensitivities['layers'])} layers at {_label(sensitivities['low'])}, saves "
                     f"{plan['bytes_saved']} bytes of weights, predicted drop {plan['predicted_drop_points']:.2f}"
                     + (f", measured drop {m['drop_points']:.2f} points (accuracy {100 * m['accuracy']:.2f} %)"
                        if m else ", not measured") + (f"; moved back: {', '.join(plan['backed_off'])}"
                                                       if plan["backed_off"] else ""))
    return "\n".join(lines)


def _label(scheme):
    return scheme if isinstance(scheme, str) else json.dumps(scheme)


def plot_sensitivity(sensitivities, path, plan=None):
    """PNG: per layer, accuracy drop (points) against bytes saved at the low scheme, the plan's layers marked;
    below, the drop per layer in graph order. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sensitivities["layers"]
    chosen = set(plan["low_layers"]) if plan else set()
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(7, 0.22 * len(rows)), 8))
    xs = np.array([r["bytes_saved"] for r in rows], float)
    ys = np.array([r["drop_points"] for r in rows], float)
    mark = np.array([r["name"] in chosen for r in rows])
    ax.scatter(xs[~mark], ys[~mark], facecolors="none", edgecolors="tab:blue", label="kept at " +
               _label(sensitivities["high"]))
    if mark.any():
        ax.scatter(xs[mark], ys[mark], color="tab:red", marker="s", label="plan: " + _label(sensitivities["low"]))
    for i in np.argsort(-ys)[:min(6, len(rows))]:
        ax.annotate(rows[i]["name"], (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel(f"bytes saved at {_label(sensitivities['low'])} (weights x bit difference / 8)")
    ax.set_ylabel("accuracy drop (points)")
    title = f"one layer at {_label(sensitivities['low'])}, others {_label(sensitivities['high'])}"
    if plan:
        title += f"; plan for {plan['budget_points']} points"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    idx = np.arange(len(rows))
    bx.bar(idx, ys, color=["tab:red" if m else "tab:blue" for m in mark])
    bx.set_xticks(idx, [r["name"] for r in rows], rotation=90, fontsize=6)
    bx.set_ylabel("accuracy drop (points)")
    fig.tight_layout()
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(data, path):
    """Write ``data`` as indented JSON, atomically."""
    from mobileqat.export import write_atomic
    write_atomic(os.fspath(path), (json.dumps(data, indent=1) + "\n").encode())
    return os.fspath(path)


def export_plan(run, plan, path):
    """Write the plan's int8 file (``ptq`` with its rules, ``export_tflite``) and check it on ``run.runtime``
    against the twin. Returns {"path", "bytes", "gzip_bytes", "grids", "accuracy" (the file's, on the
    evaluation images), "twin_accuracy", "max_lsb_vs_twin"}."""
    from mobileqat.calibration import ptq
    from mobileqat.export import export_tflite, weight_summary
    from mobileqat.runtime import TFLiteModel
    qat = ptq(run.model, run.calibration_data, plan["rules"], method=run.method, bias_correction=run.bias_correction)
    export_tflite(qat, path)
    codes = np.asarray(TFLiteModel(path, run.runtime).predict(run.x))
    twin = run._codes(qat)
    summary = weight_summary(path)
    return {"path": os.fspath(path), "bytes": summary["bytes"], "gzip_bytes": summary["gzip_bytes"],
            "grids": summary["grids"], "accuracy": run._accuracy(codes), "twin_accuracy": run._accuracy(twin),
            "max_lsb_vs_twin": int(np.abs(codes.astype(np.int32) - twin.astype(np.int32)).max())}


def write_sensitivity(run, budget, out, export=True, extra=None):
    """The whole measurement into folder ``out``: sensitivity.json (every number, the plan and, with ``export``,
    the plan's .tflite checked against the twin: plan_int8.tflite), plan.json (the rules alone, for
    ``quantize``/``ptq``/``mobileqat run --scheme``) and sensitivity.png. Returns the sensitivity.json data."""
    budget = _check_budget(budget)
    os.makedirs(out, exist_ok=True)
    sens = layer_sensitivity(run)
    plan = mixed_precision_plan(sens, budget, run)
    report = {**(extra or {}), **sens, "plan": plan}
    if export:
        run.log("plan: exporting plan_int8.tflite")
        report["plan_file"] = export_plan(run, plan, os.path.join(out, "plan_int8.tflite"))
    write_json(plan["rules"], os.path.join(out, "plan.json"))
    plot_sensitivity(sens, os.path.join(out, "sensitivity.png"), plan)
    write_json(report, os.path.join(out, "sensitivity.json"))
    return report
