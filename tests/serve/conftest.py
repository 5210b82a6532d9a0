"""A tiny untrained checkpoint and one server on it, shared by the serving tests (starting a
server takes seconds: its inference worker is a separate process that loads the model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner.checkpoint import build_model, checkpoint_payload
from captioner.data.tokenizer import train_tokenizer, with_vocabulary

CAPTIONS = ["a red square left of a blue circle", "a small green triangle above a big circle"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Untrained but complete (beam 3, 8 tokens by default, 32 px, a 4x4 grid)."""
    tok = train_tokenizer(CAPTIONS)
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
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                **checkpoint_payload(config, tok, decode, 32)}, path)
    return path


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """``launch.Served`` (``url``, ``pid``) of a server with batching on (up to 8 requests, 20 ms), small limits so the
    hostile tests stay fast: 2 MB bodies, 4 Mpixel photos, 50 frames."""
    from captioner.serve.launch import served

    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with open(log, "w") as f, served([
        "--checkpoint", str(tiny_checkpoint), "--max-batch-size", "8", "--batch-timeout-ms", "20",
        "--threads", "1", "--max-body-mb", "2", "--max-pixels", "4000000", "--max-frames", "50",
        "--log-level", "error",
    ], log=f) as served_server:
        yield served_server
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
