"""make flickr8k / make rsicd: a published benchmark end to end, from the raw photos in ../shared.

    python scripts/reproduce.py flickr8k|rsicd [--decoder lstm_attention|transformer]
        [--encoder pretrained|random] [--no-scst] [--ce-epochs N] [--scst-epochs N]
        [--beams 1,3,5] [--length-penalties 0,1] [--in-process] [--out DIR]
        [train.py overrides ...]

Runs, each a plain ``train.py`` / ``evaluate.py`` command printed before it starts:
  1. cross-entropy training (experiment=<data>[_transformer]): the frozen encoder's features are
     extracted and cached on first use (data/feature_cache, reused by later runs);
  2. self-critical training from stage 1's best checkpoint (experiment=<...>_scst); both stages
     keep the checkpoint with the best val CIDEr-D (greedy, after every epoch);
  3. selection on **val**: each stage's checkpoint decoded with every beam size of ``--beams``
     and length penalty of ``--length-penalties`` (one ``evaluate.py -m`` sweep over both) and
     scored with pycocoevalcap; each stage keeps its best setting, and the stage with the best val
     CIDEr-D is the run's model;
  4. the **test** split decoded once per stage with the settings chosen on val, and scored.
Nothing is chosen on test. Writes ``results.json`` and ``results.md`` (the published table plus
this run's val and test rows, wall time per stage) into ``outputs/<data>/<time>-<decoder>-<encoder>/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from captioner.utils.hardware import machine_line  # noqa: E402
from captioner.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

METRICS = [("bleu1", "B-1"), ("bleu2", "B-2"), ("bleu3", "B-3"), ("bleu4", "B-4"),
           ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr-D")]


@dataclass
class Benchmark:
    title: str
    published: list[tuple[str, dict]]  # (system, {metric: value on the 0-1 / 0-10 scale})
    presets: dict[str, tuple[str, str]]  # decoder -> (cross-entropy, self-critical) experiment


BENCHMARKS = {
    "flickr8k": Benchmark(
        "Flickr8k, official test split (1,000 photos)",
        [("Log-bilinear (Kiros et al. 2014)",
          {"bleu1": .656, "bleu2": .424, "bleu3": .277, "bleu4": .177, "meteor": .1731}),
         ("Show, Attend and Tell, soft attention (Xu et al. 2015)",
          {"bleu1": .670, "bleu2": .448, "bleu3": .299, "bleu4": .195, "meteor": .1893}),
         ("Show, Attend and Tell, hard attention (Xu et al. 2015)",
          {"bleu1": .670, "bleu2": .457, "bleu3": .314, "bleu4": .213, "meteor": .2030})],
        {"lstm_attention": ("flickr8k", "flickr8k_scst"),
         "transformer": ("flickr8k_transformer", "flickr8k_transformer_scst")}),
    "rsicd": Benchmark(
        "RSICD, official test split (1,093 photos)",
        [("Suyog-16/rsicd-image-captioning, EfficientNet-B0 + LSTM, greedy (official test)",
          {"bleu4": .280, "cider": .643}),
         ("Suyog-16/rsicd-image-captioning, EfficientNet-B0 + Transformer, greedy (official test)",
          {"bleu4": .301, "cider": .737}),
         ("RSGPT (13B), as cited by SkyEyeGPT (split not stated)",
          {"bleu4": .368, "meteor": .301, "rouge_l": .533, "cider": 1.029})],
        {"lstm_attention": ("rsicd", "rsicd_scst"),
         "transformer": ("rsicd_transformer", "rsicd_transformer_scst")}),
}


class Clock:
    """Runs the stages one by one, printing each command and the elapsed time."""

    def __init__(self, stages: int, in_process: bool = False):
        self.start, self.stages, self.done = time.time(), stages, 0
        self.times: dict[str, float] = {}
        self.in_process = in_process

    def stage(self, name: str, args: list[str]) -> None:
        elapsed = time.time() - self.start
        self.done += 1
        print(f"\n=== [{self.done}/{self.stages}] {name} — elapsed {elapsed / 60:.1f} min ===", flush=True)
        print("+ python", " ".join(args), flush=True)
        t = time.time()
        if self.in_process:
            run_in_process(args)
        else:
            subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
        self.times[name] = time.time() - t


def run_in_process(args: list[str]) -> None:
    """``python train.py ...`` / ``python evaluate.py ...`` as a call of the same Hydra entry
    point in this process: no new interpreter's imports and no new METEOR JVM per stage (about
    10-20 s a stage on 2 cores, most of the run on a tiny subset)."""
    import importlib
    import os

    os.chdir(ROOT)  # relative paths as the subprocess sees them
    module = importlib.import_module(f"captioner.cli.{Path(args[0]).stem}")
    argv, sys.argv = sys.argv, list(args)
    try:
        code = module.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    if code not in (None, 0):
        sys.exit(f"error: stage failed with exit status {code}: python {' '.join(args)}")


def setting(decode: dict) -> str:
    """A decoding setting as a table shows it: ``beam 5, length penalty 1.0``."""
    if decode["beam_size"] == 1:
        return "greedy"
    return f"beam {decode['beam_size']}, length penalty {decode.get('length_penalty') or 0}"


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def row(name: str, metrics: dict) -> str:
    return f"| {name} | " + " | ".join(fmt(metrics.get(k)) for k, _ in METRICS) + " |"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", choices=sorted(BENCHMARKS))
    p.add_argument("--decoder", choices=["lstm_attention", "transformer"], default="lstm_attention")
    p.add_argument("--encoder", choices=["pretrained", "random"], default="pretrained",
                   help="random: the same recipe on the preset's encoder randomly initialised")
    p.add_argument("--no-scst", action="store_true", help="cross-entropy only")
    p.add_argument("--ce-epochs", type=int, help="override the preset's cross-entropy epochs")
    p.add_argument("--scst-epochs", type=int, help="override the preset's self-critical epochs")
    p.add_argument("--beams", default="1,3,5", help="beam sizes tried on val (1 = greedy)")
    p.add_argument("--length-penalties", default="0,1",
                   help="beam length penalties tried on val (decode.length_penalty; > 0 favours "
                        "longer captions)")
    p.add_argument("--in-process", action="store_true",
                   help="run the stages in this process, not one interpreter each (faster on a "
                        "tiny subset; a real run keeps each stage's memory to itself)")
    p.add_argument("--out", type=Path, help="default: outputs/<data>/<time>-<decoder>-<encoder>")
    p.add_argument("overrides", nargs="*",
                   help="extra train.py overrides for both stages (data.* ones also for evaluate.py)")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv=None) -> None:
    args = parse_args(argv)
    bench = BENCHMARKS[args.data]
    data_root = ROOT.parent / "shared" / "data" / args.data
    if not any(o.startswith(("data.root=", "data.splits.")) for o in args.overrides) and not (
            data_root / "annotations" / "captions_train.json").is_file():
        sys.exit(f"error: {args.data} not found at {data_root} (see ../shared/README.md)")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or ROOT / "outputs" / args.data / f"{stamp}-{args.decoder}-{args.encoder}"
    if out.exists():
        sys.exit(f"error: {out} exists; runs never overwrite each other")

    ce_preset, scst_preset = bench.presets[args.decoder]
    common = ["test=false", *args.overrides]
    if args.encoder == "random":
        common.append("model.encoder.pretrained=false")
    data_args = [f"data={args.data}", "data.cache_features=true",
                 *[o for o in args.overrides if o.startswith(("data.", "model.encoder."))]]
    stage_names = ["cross-entropy"] + ([] if args.no_scst else ["self-critical"])
    clock = Clock(stages=2 * len(stage_names) + 1, in_process=args.in_process)
    ckpts = {}
    for name, preset in zip(stage_names, (ce_preset, scst_preset)):
        run_dir = out / ("ce" if name == "cross-entropy" else "scst")
        train = ["train.py", f"experiment={preset}", f"hydra.run.dir={run_dir}", *common]
        if name == "self-critical":
            train.append(f"init_from={ckpts['cross-entropy']}")
        epochs = args.ce_epochs if name == "cross-entropy" else args.scst_epochs
        if epochs:
            train.append(f"trainer.max_epochs={epochs}")
        clock.stage(f"{name} training", train)
        ckpts[name] = run_dir / "checkpoints" / "best.ckpt"

    # selection on val: every stage x beam size in one sweep, scored with pycocoevalcap
    sweep = out / "val_selection"
    clock.stage(f"selection on val (beam sizes {args.beams}, length penalties "
                f"{args.length_penalties})",
                ["evaluate.py", "-m", "split=val", f"ckpt_path={','.join(map(str, ckpts.values()))}",
                 "decode.method=beam", f"decode.beam_size={args.beams}",
                 f"decode.length_penalty={args.length_penalties}",
                 f"hydra.sweep.dir={sweep}", *data_args])
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics_val.json"))]
    val: dict[str, dict] = {}
    for name, ckpt in ckpts.items():
        mine = [r for r in runs if Path(r["checkpoint"]) == ckpt.resolve()
                and not (r["decode"]["beam_size"] == 1 and r["decode"].get("length_penalty"))]
        val[name] = {**max(mine, key=lambda r: r["metrics"]["cider"]),  # greedy: one penalty
                     "tried": {setting(r["decode"]): r["metrics"]["cider"] for r in mine}}
    chosen = max(val, key=lambda n: val[n]["metrics"]["cider"])

    test: dict[str, dict] = {}
    for name, ckpt in ckpts.items():
        eval_dir = out / f"test_{name}"
        chosen_decode = val[name]["decode"]
        clock.stage(f"test ({name}, {setting(chosen_decode)} chosen on val)",
                    ["evaluate.py", f"ckpt_path={ckpt}", "decode.method=beam",
                     f"decode.beam_size={chosen_decode['beam_size']}",
                     f"decode.length_penalty={chosen_decode['length_penalty']}",
                     f"hydra.run.dir={eval_dir}", *data_args])
        test[name] = json.loads((eval_dir / "metrics_test.json").read_text())
    wall = time.time() - clock.start

    label = f"captioner {'LSTM-attention' if args.decoder == 'lstm_attention' else 'Transformer'}"
    label += " (random-init encoder)" if args.encoder == "random" else ""
    head = "| system | " + " | ".join(h for _, h in METRICS) + " |"
    table = [f"### {bench.title}", "", head, "|---" * (len(METRICS) + 1) + "|"]
    table += [row(n, m) for n, m in bench.published]
    for name in reversed(stage_names):  # the final model first
        mark = "**" if name == chosen else ""
        table.append(row(f"{mark}{label}, {name}, {setting(val[name]['decode'])}{mark}",
                         test[name]["metrics"]))
    table += ["", "Validation (what was selected on):", "", head, "|---" * (len(METRICS) + 1) + "|"]
    for name in reversed(stage_names):
        tried = ", ".join(f"{b}: {c:.3f}" for b, c in val[name]["tried"].items())
        table.append(row(f"{label}, {name}, {setting(val[name]['decode'])} "
                         f"(CIDEr-D of each setting: {tried})", val[name]["metrics"]))
    summary = {
        "date": stamp, "machine": machine_line(), "python": platform.python_version(),
        "wall_time_s": round(wall), "stage_times_s": {k: round(v) for k, v in clock.times.items()},
        "command": " ".join(["python", "scripts/reproduce.py", *sys.argv[1:]]),
        "data": args.data, "decoder": args.decoder, "encoder": args.encoder, "chosen_on_val": chosen,
        "val": {k: {"metrics": r["metrics"], "decode": r["decode"], "tried": r["tried"]}
                for k, r in val.items()},
        "test": {k: {"metrics": r["metrics"], "decode": r["decode"], "checkpoint": r["checkpoint"]}
                 for k, r in test.items()},
    }
    atomic_write_json(out / "results.json", summary)
    stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in clock.times.items())
    text = "\n".join(table) + f"\n\nwall time {wall / 60:.1f} min ({stages}); {machine_line()}\n"
    atomic_write_bytes(out / "results.md", text.encode())
    print("\n" + text + f"\nwrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
