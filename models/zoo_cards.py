"""Model cards of the zoo: one ``mobileqat demo --model NAME`` run per model, then one markdown table.

    python models/zoo_cards.py --out /tmp/zoo_cards                 # every model of ZOO, one after the other
    python models/zoo_cards.py --out /tmp/zoo_cards --models resnet20 --epochs 4
    python models/zoo_cards.py --out /tmp/zoo_cards --table-only    # the table of the reports already written

Each model runs in its own process (``python -m mobileqat.cli demo ... --out OUT/NAME``; its log in
OUT/NAME.log) on the built-in synthetic shapes: float training, PTQ int8, QAT fine-tune, QAT int8, validation
on the held-out split by the TFLite runtimes, benchmark (1 thread, median), and the integer twin against both
runtimes. A run that was interrupted resumes where it stopped; a finished one is only read. The table
(OUT/zoo.md, also printed) takes every number from OUT/NAME/report.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

# model -> width multiplier given with --alpha (None: the model has none)
ZOO = {"mobilenet_v3_small": 1.0, "mobilenet_v3_small_minimalistic": 1.0, "mobilenet_v3_large": 1.0,
       "mobilenet_v3_large_minimalistic": 1.0, "efficientnet_lite_b0": None, "efficientnet_lite_b1": None,
       "efficientnet_lite_b2": None, "resnet20": None}


def demo_command(name, out, args):
    """The ``mobileqat demo`` command line of model ``name``."""
    cmd = [sys.executable, "-m", "mobileqat.cli", "demo", "--model", name, "--out", os.path.join(out, name),
           "--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs),
           "--qat-epochs", str(args.qat_epochs), "--seed", str(args.seed)]
    alpha = ZOO.get(name)
    return cmd + (["--alpha", str(alpha)] if alpha is not None else [])


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def _ms(v):
    return "-" if v is None else f"{v:.3f}"


def table(out, names):
    """Markdown table of OUT/NAME/report.json for each of ``names`` that has one."""
    cols = ["model", "params", "float", "PTQ int8", "QAT int8 (XNNPACK / reference)", "QAT int8 − float",
            "int8 size", "float size", "latency XNNPACK float / int8 (ms)", "twin max LSB ref / XNNPACK",
            "float / QAT step (s)", "run (min)"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in names:
        path = os.path.join(out, name, "report.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        v, m, t = r["variants"], r["model"], r["timings"]
        q, fl, fid = v["qat_int8"], v["float"], v["qat_int8"]["fidelity"]
        alpha = f" (α {m['alpha']:.2f})" if m.get("alpha") is not None else ""
        twin = (f"{fid['max_lsb_diff']} / {fid['max_lsb_diff_xnnpack']}" if fid.get("simulation") == "integer"
                else f"not lowered: {fid.get('integer_path_error')}")
        drop = r["accuracy_drop_points"]["qat_int8"]
        rows.append("| " + " | ".join([
            f"{name}{alpha}", f"{m['params']:,}", _pct(fl["accuracy"]), _pct(v["ptq_int8"]["accuracy"]),
            f"{_pct(q['accuracy'])} / {_pct(q['accuracy_reference'])}",
            "-" if drop is None else f"{-drop:+.1f} points",
            f"{q['tflite_bytes']:,} B", f"{fl['tflite_bytes']:,} B",
            f"{_ms(fl['latency_ms'].get('xnnpack'))} / {_ms(q['latency_ms'].get('xnnpack'))}", twin,
            f"{t['float_step_s']:.3f} / {t['qat_step_s']:.3f}", f"{t['total_s'] / 60:.1f}"]) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder of the runs (OUT/NAME/report.json, OUT/NAME.log)")
    p.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=6, help="float epochs")
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true", help="no runs: the table of the reports in OUT")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.table_only:
        for name in args.models:
            cmd = demo_command(name, args.out, args)
            print(" ".join(["mobileqat"] + cmd[3:]), flush=True)
            t0 = time.time()
            with open(os.path.join(args.out, f"{name}.log"), "a") as log:
                code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"  exit {code}, {(time.time() - t0) / 60:.1f} min", flush=True)
    text = table(args.out, args.models)
    with open(os.path.join(args.out, "zoo.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
