"""Shared fixtures: a tiny embedded data set and the real Hydra config with tiny overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from captioner.utils.hydra import CONFIG_DIR, compose_config, register_resolvers  # noqa: F401

torch.set_num_threads(min(2, os.cpu_count() or 1))
register_resolvers()
SHARED = Path(__file__).resolve().parents[2] / "shared"


def benchmark_subset(name: str, tmp_path: Path, n: int = 24) -> list[str]:
    """Overrides pointing each split of ../shared/data/<name> at its first n images (COCO files
    written to tmp_path), for running a benchmark's real pipeline in seconds."""
    from captioner.data.captions import write_coco_subset

    overrides = []
    for split in ("train", "val", "test"):
        path = write_coco_subset(SHARED / "data" / name / "annotations" / f"captions_{split}.json",
                                 n, tmp_path / f"{split}.json")
        overrides.append(f"data.splits.{split}.annotations={path}")
    return overrides

TINY_DATA = [
    "data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.num_test=8",
    "data.synthetic.image_size=32", "data.image_size=32", "data.batch_size=8",
    "data.eval_batch_size=8", "data.num_workers=0",
]
TINY_MODEL = [
    "model.encoder.return_layer=layer2", "model.decoder.embed_dim=16",
    "model.decoder.hidden_size=32", "model.decoder.attention_dim=16",
]


def eval_config(ckpt, synthetic_root, output_dir, *overrides: str):
    """The real eval config on the tiny embedded set (same generator parameters as TINY_DATA)."""
    return compose_config("eval", [
        f"ckpt_path={ckpt}", f"data.root={synthetic_root}", "data.synthetic.num_train=24",
        "data.synthetic.num_val=8", "data.synthetic.num_test=8", "data.synthetic.image_size=32",
        "data.num_workers=0", *overrides,
    ], output_dir)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from captioner.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, num_train=24, num_val=8, num_test=8, image_size=32, seed=0)
    return root


@pytest.fixture
def train_cfg(tmp_path, synthetic_root):
    def make(*overrides: str):
        return compose_config("train", [
            f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "~logger", f"threads={torch.get_num_threads()}", *overrides,
        ], tmp_path)

    return make
