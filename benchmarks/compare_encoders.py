"""EfficientNet-Lite0 vs Lite2 vs Lite2 fine-tuned on a real benchmark's **val** split, with the
same decoder and the same number of epochs; wall time of each reported beside its scores.

    python benchmarks/compare_encoders.py [--data flickr8k|rsicd] [--epochs 2]
        [--variants lite0 lite2 lite2_finetuned] [--out DIR] [train.py overrides ...]

Variants (the Transformer preset of the benchmark, ``experiment=<data>_transformer``):
    lite0             frozen EfficientNet-Lite0 at its native 224 px (7x7 regions), cached features
    lite2             frozen EfficientNet-Lite2 at its native 260 px (9x9 regions), cached features
    lite2_random      Lite2's architecture with random weights, frozen, cached (what ImageNet
                      weights add; not in the default ``--variants``)
    lite2_finetuned   Lite2 at 260 px, frozen for the first epoch, then its last ``--tune-layers``
                      blocks trained at ``--tune-lr``; the frozen trunk's maps are cached, so
                      every step runs only those blocks (its first Flickr8k run, early on
                      2026-12-02, had no cache: the whole encoder every step, the same function,
                      55 min against 18 for frozen Lite2)
Each variant is a plain ``train.py`` command (printed before it starts; the cosine schedule spans
the run), keeping its best val checkpoint (greedy CIDEr-D after every epoch). One
``evaluate.py -m split=val`` sweep then decodes every best checkpoint with beam 3 and scores it
with pycocoevalcap. Only val is decoded: this study chooses the default encoder, so the test
split is never looked at. Writes ``compare_encoders.json`` and ``compare_encoders.md`` into
``outputs/compare_encoders/<data>-<time>/``. Run again with the same ``--out`` (and more or other
``--variants``), it trains only the variants not yet trained there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from captioner.utils.hardware import machine_line  # noqa: E402
from captioner.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

METRICS = [("bleu1", "B-1"), ("bleu4", "B-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"),
           ("cider", "CIDEr-D")]


def variants(tune_layers: int, tune_lr: float) -> dict[str, list[str]]:
    return {
        "lite0": ["model/encoder=efficientnet_lite0", "data.image_size=224"],
        "lite2": ["model/encoder=efficientnet_lite2", "data.image_size=260"],
        "lite2_random": ["model/encoder=efficientnet_lite2", "data.image_size=260",
                         "model.encoder.pretrained=false"],
        "lite2_finetuned": ["model/encoder=efficientnet_lite2", "data.image_size=260",
                            "data.cache_features=true", "model.encoder.trainable=true",
                            f"model.encoder.trainable_layers={tune_layers}",
                            "model.encoder.finetune_after_epoch=1",
                            f"model.encoder.finetune_lr={tune_lr}"],
    }


def run(cmd: list[str]) -> float:
    """Run one command from the project root, echoed first; its wall time in seconds."""
    print("+ python " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    return time.time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="compare_encoders.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["flickr8k", "rsicd"], default="flickr8k")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every variant (the budget)")
    p.add_argument("--variants", nargs="+", default=["lite0", "lite2", "lite2_finetuned"])
    p.add_argument("--tune-layers", type=int, default=2,
                   help="blocks of Lite2 fine-tuned (from the head down)")
    p.add_argument("--tune-lr", type=float, default=1e-4, help="the fine-tuned encoder's lr")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="train.py overrides for every variant")
    args = p.parse_intermixed_args(argv)
    table = variants(args.tune_layers, args.tune_lr)
    unknown = sorted(set(args.variants) - set(table))
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; known: {sorted(table)}")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / "compare_encoders" / f"{args.data}-{stamp}"
    # a study interrupted (or extended by more variants) goes on in its --out: a variant whose
    # training finished there (its time in times.json) is not trained again
    record = out / "times.json"
    times = json.loads(record.read_text()) if record.is_file() else {}
    ckpts = {}
    for name in args.variants:
        run_dir = out / name
        ckpts[name] = (run_dir / "checkpoints" / "best.ckpt").resolve()
        if name in times and ckpts[name].is_file():
            print(f"{name}: trained in {run_dir} ({times[name] / 60:.1f} min), not again")
            continue
        if run_dir.exists():
            sys.exit(f"error: {run_dir} exists without a finished training; remove it first")
        times[name] = run(["train.py", f"experiment={args.data}_transformer", *table[name],
                           f"trainer.max_epochs={args.epochs}", "test=false",
                           f"hydra.run.dir={run_dir}", *args.overrides])
        atomic_write_json(record, times)

    sweep = out / f"val_{'_'.join(args.variants)}"
    data_args = [o for o in args.overrides if o.startswith("data.")]
    run(["evaluate.py", "-m", "split=val", f"data={args.data}", "data.cache_features=true",
         f"ckpt_path={','.join(str(c) for c in ckpts.values())}", "decode.method=beam",
         "decode.beam_size=3", f"hydra.sweep.dir={sweep}", *data_args])
    found = {Path(m["checkpoint"]): m for m in
             (json.loads(f.read_text()) for f in sweep.glob("*/metrics_val.json"))}
    results = {name: {"metrics": found[ckpts[name]]["metrics"], "train_wall_s": round(times[name]),
                      "overrides": table[name]} for name in args.variants}

    head = "| encoder (val, beam 3) | " + " | ".join(h for _, h in METRICS) + " | training wall time |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['metrics'][k]:.3f}" for k, _ in METRICS)
        lines.append(f"| {name} | {cells} | {r['train_wall_s'] / 60:.1f} min |")
    best = max(results, key=lambda n: results[n]["metrics"]["cider"])
    text = (f"### {args.data} val, Transformer decoder, {args.epochs} epochs each\n\n"
            + "\n".join(lines) + f"\n\nbest on val CIDEr-D: {best}; {machine_line()}\n")
    atomic_write_json(out / "compare_encoders.json", {
        "date": stamp, "machine": machine_line(), "data": args.data, "epochs": args.epochs,
        "command": " ".join(["python", "benchmarks/compare_encoders.py", *sys.argv[1:]]),
        "results": results, "best_on_val": best})
    atomic_write_bytes(out / "compare_encoders.md", text.encode())
    print("\n" + text + f"\nwrote {out}/compare_encoders.json and compare_encoders.md")


if __name__ == "__main__":
    main()
