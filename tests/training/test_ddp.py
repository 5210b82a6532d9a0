"""Lightning DDP on CPU (gloo): validation metrics cover the whole split, not one rank's shard."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ddp_validation_counts_every_image_once(tmp_path):
    # 9 validation images on 2 ranks: the distributed sampler pads to 10 (one image twice)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={out}",
        f"data.root={tmp_path / 'synthetic'}", "data.synthetic.num_train=16",
        "data.synthetic.num_val=9", "data.synthetic.num_test=4", "data.synthetic.image_size=32",
        "data.image_size=32", "data.batch_size=4", "data.eval_batch_size=2", "data.num_workers=0",
        *TINY_MODEL, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "val_decode.max_length=5", "test=false", "~logger.tensorboard", "~callbacks.progress_bar",
    ]
    done = subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True, text=True)
    assert "Starting with 2 processes" in done.stdout + done.stderr  # really distributed
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").read_text().splitlines()))
    counts = [float(r["val/num_images"]) for r in rows if r.get("val/num_images")]
    assert counts == [9.0]
