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


# ---- serving (tests/serve/): a tiny untrained checkpoint and one server on it, shared by the
# serving tests (starting a server takes seconds: its inference worker is a separate process that
# loads the model). Here, not in tests/serve/conftest.py: test modules import this conftest by
# name, and a second conftest.py would take its place in sys.modules.
SERVE_CAPTIONS = ["a red square left of a blue circle", "a small green triangle above a big circle"]


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """Untrained but complete (beam 3, 8 tokens by default, 32 px, a 4x4 grid)."""
    from captioner.checkpoint import build_model, save_checkpoint
    from captioner.data.tokenizer import train_tokenizer, with_vocabulary

    tok = train_tokenizer(SERVE_CAPTIONS)
    config = with_vocabulary({
        "_target_": "captioner.models.captioner.Captioner",
        "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                    "return_layer": "layer2"},
        "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                    "embed_dim": 16, "hidden_size": 32, "attention_dim": 16}}, tok)
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp("serve_ckpt") / "tiny.ckpt"
    decode = {"method": "beam", "beam_size": 3, "max_length": 8}
    return save_checkpoint(path, model, config, tok, decode, 32)


@pytest.fixture(scope="session")
def caption_server(serve_checkpoint, tmp_path_factory):
    """``launch.Served`` (``url``, ``pid``) of a server with batching on (up to 8 requests,
    20 ms), small limits so the hostile tests stay fast: 2 MB bodies, 4 Mpixel photos, 50 frames."""
    from captioner.serve.launch import served

    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with open(log, "w") as f, served([
        "--checkpoint", str(serve_checkpoint), "--max-batch-size", "8", "--batch-timeout-ms", "20",
        "--threads", "1", "--max-body-mb", "2", "--max-pixels", "4000000", "--max-frames", "50",
        "--log-level", "error",
    ], log=f) as served_server:
        yield served_server
        # read before shutdown: LitServe's worker monitor may log a broken pipe while it stops
        text = log.read_text()
    assert "Traceback" not in text, text[-3000:]

