"""make demo: train on the embedded data, evaluate the best checkpoint on the test split with
pycocoevalcap, and caption one test image (with an attention picture)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


STAGES: dict[str, float] = {}


def sh(stage: str, *args: str) -> None:
    print("+", " ".join(args), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    STAGES[stage] = time.time() - start


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from captioner.cli.caption import newest_checkpoint
    from captioner.utils.hardware import machine_line

    start = time.time()
    sh("train", "train.py", "experiment=demo", *sys.argv[1:])
    ckpt = newest_checkpoint(ROOT / "outputs" / "train")
    sh("evaluate", "evaluate.py", f"ckpt_path={ckpt}")
    metrics_file = max((ROOT / "outputs" / "eval").glob("runs/*/metrics_test.json"),
                       key=lambda p: p.stat().st_mtime)
    metrics = json.loads(metrics_file.read_text())["metrics"]
    image = sorted((ROOT / "data" / "synthetic" / "images" / "test").glob("*.png"))[0]
    sh("caption", "caption.py", str(image), "--checkpoint", str(ckpt), "--attention", "outputs/demo_attention.png")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in STAGES.items())
    print(f"\ndemo finished in {time.time() - start:.0f} s ({stages}); checkpoint {ckpt}")
    print(machine_line())
    print(f"test BLEU-4 {metrics['bleu4']:.4f}  CIDEr-D {metrics['cider']:.4f} (0-10 scale)")


if __name__ == "__main__":
    main()
