"""report.json (the contract in DESIGN.md) and report.md, written atomically."""
import json
import os

from mobileqat.export import write_atomic


def write_report(report, out_dir):
    """Write ``out_dir``/report.json and report.md; returns the json path."""
    path = os.path.join(os.fspath(out_dir), "report.json")
    write_atomic(path, (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())
    write_atomic(os.path.join(os.fspath(out_dir), "report.md"), markdown(report).encode())
    return path


def _pct(v):
    return "—" if v is None else f"{100 * v:.2f} %"


def _num(v, fmt="{:.3f}"):
    return "—" if v is None else fmt.format(v)


def markdown(report):
    ds, model, variants = report["dataset"], report["model"], report["variants"]
    lines = [f"# mobileqat report: {model['name']} on {ds['name']}", "",
             f"Data: {ds['train']} train / {ds['test']} test images, input {ds['input_shape']}, "
             f"{ds['classes']} classes. Model: {model['params']:,} parameters.", "",
             "| variant | TFLite accuracy (XNNPACK) | Keras accuracy | size (bytes) | latency XNNPACK (ms) |",
             "|---|---|---|---|---|"]
    for name, v in variants.items():
        lines.append(f"| {name} | {_pct(v.get('accuracy'))} | {_pct(v.get('sim_accuracy', v.get('keras_accuracy')))} | "
                     f"{v.get('tflite_bytes', 0):,} | {_num(v.get('latency_ms', {}).get('xnnpack'))} |")
    qat = variants.get("qat_int8", {})
    fid = qat.get("fidelity")
    if fid:
        lines += ["", "## Fidelity: Keras QAT simulation vs integer TFLite (output codes)", "",
                  f"- top-1 agreement, reference kernels: {_pct(fid.get('top1_agreement_reference'))}",
                  f"- top-1 agreement, XNNPACK: {_pct(fid.get('top1_agreement_xnnpack'))}",
                  f"- outputs within 1 LSB (reference): {_pct(fid.get('frac_within_1lsb'))}",
                  f"- max difference: {fid.get('max_lsb_diff')} LSB",
                  f"- reference kernels vs XNNPACK: {_pct((fid.get('reference_vs_xnnpack') or {}).get('top1_agreement'))}"
                  f" top-1 agreement, max {(fid.get('reference_vs_xnnpack') or {}).get('max_lsb_diff')} LSB"]
        rows = fid.get("per_layer") or []
        if rows:
            lines += ["", "Per layer (reference kernels; *accumulated* through the network, *local* = the layer fed "
                      "the TFLite's own inputs, *builtin* = reference vs optimized builtin kernels):", "",
                      "| layer | op | max LSB | mean LSB | local max LSB | ref vs builtin max LSB |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['layer']} | {r['op']} | {r['max_lsb_diff']} | {r['mean_lsb_diff']:.4f} | "
                      f"{r.get('local_max_lsb_diff', '—')} | {r.get('runtime_max_lsb_diff', '—')} |" for r in rows]
    ratios = report.get("ratios")
    if ratios:
        lines += ["", "## Ratios", ""] + [f"- {k}: {_num(v)}" for k, v in ratios.items()]
    t = report.get("timings", {})
    lines += ["", f"Train step (median): float {_num(t.get('float_step_s'), '{:.4f}')} s, "
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
    r = report.get("ratios", {})
    return [
        f"dataset {report['dataset']['name']} ({report['dataset']['test']} test images), "
        f"model {report['model']['name']} ({report['model']['params']:,} params)",
        "accuracy (TFLite, XNNPACK): " + ", ".join(
            f"{k} {_pct(v[k].get('accuracy'))}" for k in v),
        f"QAT simulation accuracy {_pct(q.get('sim_accuracy'))}; top-1 agreement sim<->reference "
        f"{_pct(fid.get('top1_agreement_reference'))}, sim<->XNNPACK {_pct(fid.get('top1_agreement_xnnpack'))}",
        f"outputs within 1 LSB {_pct(fid.get('frac_within_1lsb'))}, max {fid.get('max_lsb_diff')} LSB",
        f"int8/fp32: latency (XNNPACK) {_num(r.get('int8_fp32_latency_xnnpack'))}, size "
        f"{_num(r.get('int8_fp32_size'))}; QAT/float train step {_num(r.get('qat_float_step_time'))}",
    ]
