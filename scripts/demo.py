"""make demo: train on the embedded data, evaluate the best checkpoint on the test split with
pycocoevalcap, and caption one test image (with an attention picture).

Training runs as its own ``train.py`` process (Hydra's run directory and log); evaluation and
captioning run in this process through the same library functions the ``evaluate.py`` and
``caption.py`` commands call (each command is printed), so the libraries are imported once
instead of once per command (about 10 s each on 2 cores)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES: dict[str, float] = {}


def stage(name: str, command: str, fn, *args):
    print(f"+ {command}", flush=True)
    start = time.time()
    result = fn(*args)
    STAGES[name] = time.time() - start
    return result


def train(overrides: list[str]) -> None:
    subprocess.run([sys.executable, "train.py", "experiment=demo", *overrides], cwd=ROOT, check=True)


def evaluate(ckpt: Path) -> dict:
    from captioner.cli.evaluate import run
    from captioner.utils.hydra import compose_config

    out = ROOT / "outputs" / "eval" / "runs" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_demo"
    out.mkdir(parents=True, exist_ok=True)
    return run(compose_config("eval", [f"ckpt_path={ckpt}"], out), out)


def caption(argv: list[str]) -> None:
    from captioner.cli.caption import main

    if main(argv) != 0:
        raise SystemExit("caption.py failed")


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from captioner.cli.caption import newest_checkpoint
    from captioner.utils.cpu import keep_freed_memory
    from captioner.utils.hardware import machine_line

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    keep_freed_memory()
    start = time.time()
    overrides = sys.argv[1:]
    stage("train", " ".join(["python train.py experiment=demo", *overrides]), train, overrides)
    ckpt = newest_checkpoint(ROOT / "outputs" / "train")
    metrics = stage("evaluate", f"python evaluate.py ckpt_path={ckpt}", evaluate, ckpt)
    image = sorted((ROOT / "data" / "synthetic" / "images" / "test").glob("*.png"))[0]
    argv = [str(image), "--checkpoint", str(ckpt), "--attention", str(ROOT / "outputs" / "demo_attention.png")]
    stage("caption", "python caption.py " + " ".join(argv), caption, argv)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in STAGES.items())
    print(f"\ndemo finished in {time.time() - start:.0f} s ({stages}); checkpoint {ckpt}")
    print(machine_line())
    print(f"test BLEU-4 {metrics['bleu4']:.4f}  CIDEr-D {metrics['cider']:.4f} (0-10 scale)")


if __name__ == "__main__":
    main()
