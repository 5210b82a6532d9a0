"""make rsicd: the RSICD benchmark end to end, from the raw images in ../shared/data/rsicd.

    python scripts/rsicd.py [--decoder lstm|transformer] [--encoder pretrained|random]
                            [--no-scst] [--ce-epochs N] [--scst-epochs N] [--out DIR]

Runs, each a plain ``train.py`` / ``evaluate.py`` command printed before it starts:
  1. cross-entropy training (experiment=rsicd or rsicd_transformer): the frozen encoder's features
     are extracted and cached on first use (data/feature_cache, reused by later runs);
  2. self-critical training from stage 1's best checkpoint (experiment=rsicd_scst /
     rsicd_transformer_scst); both stages select their checkpoint on val CIDEr-D;
  3. evaluate.py on the test split for both stages' best checkpoints (pycocoevalcap).
Writes ``results.json`` and ``results.md`` (the published table plus this run's rows) into the
run's own folder ``outputs/rsicd/<time>-<decoder>-<encoder>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from captioner.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "rsicd"

# Published RSICD test results (CIDEr on the 0-10 scale, as printed in the papers / 100).
PUBLISHED = [
    ("Lu et al. 2017 soft attention (VGG16 + LSTM)", 0.362, 0.326, 0.611, 1.964),
    ("Lu et al. 2017 hard attention (GoogLeNet), their best", 0.373, 0.332, 0.628, 2.021),
    ("FC-Att (Zhang et al. 2019)", 0.457, None, 0.633, 2.366),
    ("cross-hierarchy attention + self-critical (Wang et al. 2021)", 0.471, None, 0.651, 2.363),
]
PRESETS = {"lstm": ("rsicd", "rsicd_scst"), "transformer": ("rsicd_transformer", "rsicd_transformer_scst")}


class Clock:
    def __init__(self, stages: int):
        self.start, self.stages, self.done = time.time(), stages, 0
        self.times: dict[str, float] = {}

    def stage(self, name: str, args: list[str]) -> None:
        elapsed = time.time() - self.start
        self.done += 1
        print(f"\n=== [{self.done}/{self.stages}] {name} — elapsed {elapsed / 60:.1f} min ===", flush=True)
        print("+ python", " ".join(args), flush=True)
        t = time.time()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
        self.times[name] = time.time() - t


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=sorted(PRESETS), default="lstm")
    p.add_argument("--encoder", choices=["pretrained", "random"], default="pretrained",
                   help="random: the same recipe on a randomly initialised EfficientNet-Lite0")
    p.add_argument("--no-scst", action="store_true", help="cross-entropy only")
    p.add_argument("--ce-epochs", type=int, help="override the preset's cross-entropy epochs")
    p.add_argument("--scst-epochs", type=int, help="override the preset's self-critical epochs")
    p.add_argument("--out", type=Path, help="default: outputs/rsicd/<time>-<decoder>-<encoder>")
    p.add_argument("overrides", nargs="*",
                   help="extra train.py overrides for both stages (data.* ones also for evaluate.py)")
    args = p.parse_args()
    if not (DATA / "annotations" / "captions_train.json").is_file():
        sys.exit(f"error: RSICD not found at {DATA} (see ../shared/README.md)")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / "rsicd" / f"{stamp}-{args.decoder}-{args.encoder}"
    if out.exists():
        sys.exit(f"error: {out} exists; runs never overwrite each other")

    ce_preset, scst_preset = PRESETS[args.decoder]
    common = ["test=false", f"data.root={DATA}", *args.overrides]
    if args.encoder == "random":
        common.append("model.encoder.pretrained=false")
    stages = 2 if args.no_scst else 4
    clock = Clock(stages)
    ce_dir, scst_dir = out / "ce", out / "scst"
    ce_args = ["train.py", f"experiment={ce_preset}", f"hydra.run.dir={ce_dir}", *common]
    if args.ce_epochs:
        ce_args.append(f"trainer.max_epochs={args.ce_epochs}")
    clock.stage("cross-entropy training", ce_args)
    ckpts = {"cross-entropy": ce_dir / "checkpoints" / "best.ckpt"}
    if not args.no_scst:
        scst_args = ["train.py", f"experiment={scst_preset}", f"init_from={ckpts['cross-entropy']}",
                     f"hydra.run.dir={scst_dir}", *common]
        if args.scst_epochs:
            scst_args.append(f"trainer.max_epochs={args.scst_epochs}")
        clock.stage("self-critical training", scst_args)
        ckpts["self-critical"] = scst_dir / "checkpoints" / "best.ckpt"

    rows = {}
    for name, ckpt in reversed(ckpts.items()):  # the final model first
        eval_dir = out / f"test_{name}"
        clock.stage(f"test evaluation ({name})",
                    ["evaluate.py", "data=rsicd", f"data.root={DATA}", "data.cache_features=true",
                     f"ckpt_path={ckpt}", f"hydra.run.dir={eval_dir}",
                     *[o for o in args.overrides if o.startswith("data.")]])
        rows[name] = json.loads((eval_dir / "metrics_test.json").read_text())
    wall = time.time() - clock.start

    label = f"captioner {'LSTM-attention' if args.decoder == 'lstm' else 'Transformer'}"
    label += ", EfficientNet-Lite0" + (" (random init)" if args.encoder == "random" else "")
    table = ["| system | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |", "|---|---|---|---|---|"]
    table += [f"| {n} | {fmt(b)} | {fmt(m)} | {fmt(r)} | {fmt(c)} |" for n, b, m, r, c in PUBLISHED]
    for name, r in rows.items():
        m = r["metrics"]
        table.append(f"| **{label}, {name}** | {m['bleu4']:.3f} | {m['meteor']:.3f} | "
                     f"{m['rouge_l']:.3f} | {m['cider']:.3f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU threads, {platform.python_version()}"
    summary = {
        "date": stamp, "machine": machine, "wall_time_s": round(wall),
        "stage_times_s": {k: round(v) for k, v in clock.times.items()},
        "command": " ".join(["python", "scripts/rsicd.py", *sys.argv[1:]]),
        "decoder": args.decoder, "encoder": args.encoder,
        "test": {k: {"metrics": r["metrics"], "decode": r["decode"], "checkpoint": r["checkpoint"]}
                 for k, r in rows.items()},
    }
    atomic_write_json(out / "results.json", summary)
    text = "\n".join(table) + f"\n\nwall time {wall / 60:.1f} min ({summary['stage_times_s']}), {machine}\n"
    atomic_write_bytes(out / "results.md", text.encode())
    print("\n" + text + f"\nwrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
