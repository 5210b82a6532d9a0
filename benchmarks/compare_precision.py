"""Does bf16 autocast change what the model learns? fp32 vs bf16-mixed on the embedded data.

    python benchmarks/compare_precision.py [--seeds 1 2] [--epochs 5] [train.py overrides ...]

Trains the demo recipe (``experiment=demo``: ResNet-18 to layer3 from scratch + attention LSTM,
4,000 embedded training images) once per precision and seed, with ``test=false``, and reports per
run the best validation CIDEr-D (the checkpoint-selection metric, decoded as training validates)
and the training wall time. Different seeds show the run-to-run spread that "unchanged within
noise" is judged against. Writes ``outputs/compare_precision/<time>/compare_precision.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def best_val_cider(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        values = [float(r["val/cider"]) for r in csv.DictReader(f) if r.get("val/cider")]
    if not values:
        raise SystemExit(f"error: no val/cider in {run_dir / 'csv' / 'metrics.csv'}")
    return max(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args()
    out = ROOT / "outputs" / "compare_precision" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if out.exists():
        sys.exit(f"error: {out} exists; runs never overwrite each other")

    rows = []
    for seed in args.seeds:
        for name, precision in PRECISIONS.items():  # alternate, so machine load hits both alike
            run_dir = out / f"{name}-seed{seed}"
            cmd = [sys.executable, "train.py", "experiment=demo", f"trainer.precision={precision}",
                   f"trainer.max_epochs={args.epochs}", f"seed={seed}", "test=false",
                   f"hydra.run.dir={run_dir}", *args.overrides]
            print("+", " ".join(cmd[1:]), flush=True)
            start = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True)
            rows.append({"precision": name, "seed": seed, "train_s": round(time.time() - start, 1),
                         "best_val_cider": round(best_val_cider(run_dir), 4)})

    summary = {}
    for name in PRECISIONS:
        ciders = [r["best_val_cider"] for r in rows if r["precision"] == name]
        times = [r["train_s"] for r in rows if r["precision"] == name]
        summary[name] = {"mean_val_cider": round(statistics.mean(ciders), 4),
                         "spread_val_cider": round(max(ciders) - min(ciders), 4),
                         "mean_train_s": round(statistics.mean(times), 1)}
    speedup = summary["fp32"]["mean_train_s"] / summary["bf16"]["mean_train_s"]
    table = ["| precision | seed | best val CIDEr-D | training wall time (s) |", "|---|---:|---:|---:|"]
    table += [f"| {r['precision']} | {r['seed']} | {r['best_val_cider']:.3f} | {r['train_s']:.0f} |"
              for r in rows]
    table.append("")
    table += [f"{n}: mean val CIDEr-D {s['mean_val_cider']:.3f} (spread over seeds "
              f"{s['spread_val_cider']:.3f}), mean wall time {s['mean_train_s']:.0f} s"
              for n, s in summary.items()]
    table.append(f"bf16 wall-time speed-up over fp32 (whole run incl. validation): {speedup:.2f}x")
    text = "\n".join(table)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_precision.md").write_text(text + "\n")
    (out / "compare_precision.json").write_text(json.dumps(
        {"runs": rows, "summary": summary, "speedup": round(speedup, 2), "epochs": args.epochs,
         "overrides": args.overrides}, indent=2) + "\n")
    print(f"wrote {out / 'compare_precision.md'}")


if __name__ == "__main__":
    main()
