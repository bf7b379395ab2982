"""report.json (the contract in DESIGN.md) and report.md, written atomically."""
import json
import os

from mobileqat import faults
from mobileqat.export import write_atomic


def write_report(report, out_dir):
    """Write ``out_dir``/report.json and report.md; returns the json path."""
    path = os.path.join(os.fspath(out_dir), "report.json")
    write_atomic(os.path.join(os.fspath(out_dir), "report.md"), markdown(report).encode("utf-8", "backslashreplace"))
    faults.point("report")
    write_atomic(path, (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())  # last: the run is complete
    return path


_SIMULATION = {"integer": "the QAT model's integer-exact path (mobileqat.lowering), in each runtime's own "
                          "arithmetic; the float fake-quant Keras model is the second row",
               "float": "the float fake-quant Keras model (the model could not be lowered to integers)"}


def _pixels(ds):
    """", pixels scaled x/127.5 - 1" etc. for a streamed image folder (its summary says how), else ""."""
    how = {"-1..1": "x/127.5 - 1", "0..1": "x/255", "0..255": "x (0..255)"}.get(ds.get("pixels"))
    if ds.get("pixels") == "mean_std":
        how = f"(x - {ds.get('mean')}) / {ds.get('std')}"
    return f", pixels scaled {how}" if how else ""


def _pct(v):
    return "—" if v is None else f"{100 * v:.2f} %"


def _num(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def _negated(v):
    return None if v is None else -v


def markdown(report):
    ds, model, variants = report["dataset"], report["model"], report["variants"]
    lines = [f"# mobileqat report: {model['name']} on {ds['name']}", "",
             f"Data: {ds['train']} train / {ds['test']} test images, input {ds['input_shape']}, "
             f"{ds['classes']} classes{_pixels(ds)}. Model: {model['params']:,} parameters.", ""]
    if model.get("source") == "model_file":
        lines += [f"Float model: your trained model `{model.get('file')}` (sha256 {str(model.get('sha256'))[:12]}…, "
                  f"outputs {model.get('output')}), not trained here: the PTQ and QAT files start from it.", ""]
    lines += ["| variant | TFLite accuracy (XNNPACK) | Keras accuracy | size (bytes) | latency XNNPACK (ms) |",
              "|---|---|---|---|---|"]
    for name, v in variants.items():
        lines.append(f"| {name} | {_pct(v.get('accuracy'))} | {_pct(v.get('sim_accuracy', v.get('keras_accuracy')))} | "
                     f"{v.get('tflite_bytes', 0):,} | {_num(v.get('latency_ms', {}).get('xnnpack'))} |")
    lines += _weights_section(variants)
    qat = variants.get("qat_int8", {})
    fid = qat.get("fidelity")
    if fid:
        fs = fid.get("float_simulation") or {}
        rx = fid.get("reference_vs_xnnpack") or {}
        lines += ["", "## Fidelity: QAT simulation vs integer TFLite (output codes)", "",
                  f"Simulation: {_SIMULATION.get(fid.get('simulation'), fid.get('simulation'))}.", "",
                  "| simulation | top-1 agreement, reference | top-1 agreement, XNNPACK | within 1 LSB (ref) "
                  "| max LSB (ref) | within 1 LSB (XNNPACK) | max LSB (XNNPACK) |", "|---|---|---|---|---|---|---|"]
        for label, f in ((fid.get("simulation") or "—", fid), ("float (Keras fake-quant)", fs)):
            lines.append(f"| {label} | {_pct(f.get('top1_agreement_reference'))} | "
                         f"{_pct(f.get('top1_agreement_xnnpack'))} | {_pct(f.get('frac_within_1lsb'))} | "
                         f"{f.get('max_lsb_diff')} | {_pct(f.get('frac_within_1lsb_xnnpack'))} | "
                         f"{f.get('max_lsb_diff_xnnpack')} |")
        lines += ["", f"Reference kernels vs XNNPACK: {_pct(rx.get('top1_agreement'))} top-1 agreement, "
                  f"{_pct(rx.get('frac_within_1lsb'))} within 1 LSB, max {rx.get('max_lsb_diff')} LSB."]
        if fid.get("integer_path_error"):
            lines += ["", f"Integer-exact path not available: {fid['integer_path_error']}"]
        rows = fid.get("per_layer") or []
        if rows:
            lines += ["", "Per layer, against the reference kernels: *integer* = the integer-exact path; *float* = the "
                      "Keras simulation, accumulated through the network; *local* = the Keras layer fed the "
                      "TFLite's own inputs; *builtin* / *XNNPACK* = reference kernels vs that runtime on the same tensor "
                      "(XNNPACK's intermediates through its arithmetic on the integer-exact path):", "",
                      "| layer | op | integer max LSB | float max LSB | float mean LSB | local max LSB "
                      "| ref vs builtin max LSB | ref vs XNNPACK max LSB |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['op']} | {_dash(r.get('integer_max_lsb_diff'))} | {r['max_lsb_diff']} | "
                      f"{r['mean_lsb_diff']:.4f} | {_dash(r.get('local_max_lsb_diff'))} | "
                      f"{_dash(r.get('runtime_max_lsb_diff'))} | {_dash(r.get('xnnpack_max_lsb_diff'))} |" for r in rows]
    ratios = report.get("ratios")
    if ratios:
        lines += ["", "## Ratios", ""] + [f"- {k}: {_num(v)}" for k, v in ratios.items()]
    t = report.get("timings", {})
    lines += ["", f"Train step (median): float {_num(t.get('float_step_s'), '{:.4f}')} s"
              f"{' (not trained here)' if model.get('source') == 'model_file' else ''}, "
              f"QAT {_num(t.get('qat_step_s'), '{:.4f}')} s."]
    errors = report.get("errors")
    if errors:
        lines += ["", "## Runtime errors", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def summary_lines(report):
    """A few lines for the terminal."""
    v = report["variants"]
    q = v.get("qat_int8", {})
    fid = q.get("fidelity", {})
    fs = fid.get("float_simulation") or {}
    r = report.get("ratios", {})
    return [
        f"dataset {report['dataset']['name']} ({report['dataset']['test']} test images), "
        f"model {report['model']['name']} ({report['model']['params']:,} params)",
        "accuracy (TFLite, XNNPACK): " + ", ".join(
            f"{k} {_pct(v[k].get('accuracy'))}" for k in v)
        + f"; QAT int8 minus float: {_num(_negated((report.get('accuracy_drop_points') or {}).get('qat_int8')), '{:+.2f}')} points",
        f"QAT simulation ({fid.get('simulation')}): accuracy {_pct((q.get('integer_sim_accuracy') or {}).get('xnnpack', q.get('sim_accuracy')))}; "
        f"top-1 agreement with reference kernels {_pct(fid.get('top1_agreement_reference'))}, "
        f"with XNNPACK {_pct(fid.get('top1_agreement_xnnpack'))}",
        f"outputs within 1 LSB {_pct(fid.get('frac_within_1lsb'))} (XNNPACK {_pct(fid.get('frac_within_1lsb_xnnpack'))}), "
        f"max {fid.get('max_lsb_diff')} LSB (XNNPACK {fid.get('max_lsb_diff_xnnpack')})",
        f"float fake-quant simulation: accuracy {_pct(q.get('sim_accuracy'))}, top-1 agreement with reference "
        f"{_pct(fs.get('top1_agreement_reference'))}, within 1 LSB {_pct(fs.get('frac_within_1lsb'))}, "
        f"max {fs.get('max_lsb_diff')} LSB",
        f"int8/fp32: latency (XNNPACK) {_num(r.get('int8_fp32_latency_xnnpack'))}, size "
        f"{_num(r.get('int8_fp32_size'))}; QAT/float train step {_num(r.get('qat_float_step_time'))}",
    ]


def _weights_section(variants):
    """Bytes, gzip bytes and weight grids of the integer files; the QAT scheme per layer."""
    rows = [(k, v["weights"]) for k, v in variants.items() if v.get("weights")]
    if not rows:
        return []
    lines = ["", "## Files and weights", "",
             "| file | bytes | gzip bytes | weight tensors by grid |", "|---|---|---|---|"]
    for name, w in rows:
        grids = ", ".join(f"{n} {k}" for k, n in w.get("grids", {}).items()) or "—"
        lines.append(f"| {name} | {w['bytes']:,} | {w['gzip_bytes']:,} | {grids} |")
    scheme = variants.get("qat_int8", {}).get("scheme")
    if scheme:
        given = scheme.get("given")
        lines += ["", f"QAT scheme: `{json.dumps(given) if not isinstance(given, str) else given}`.", "",
                  "| layer | class | weight bits | per channel | rule |", "|---|---|---|---|---|"]
        for layer, p in scheme.get("layers", {}).items():
            rule = p.get("rule")
            rule = "added by a rewrite" if p.get("added_by_rewrite") else ("default" if rule is None else rule)
            per_channel = p["scheme"]["per_channel"] and p["class"] not in ("Dense", "Conv2DTranspose")
            lines.append(f"| {layer} | {p['class']} | {p['scheme']['weight_bits']} | {'yes' if per_channel else 'no'} "
                         f"| {rule} |")
    return lines


def _dash(value):
    return "—" if value is None else value
