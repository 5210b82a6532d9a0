"""ONNX parity on really trained checkpoints (slow: trains two small models, a minute or two
each on 2 cores): the demo recipe (LSTM-attention) and the Transformer preset, on a small
embedded set, then 50 test images captioned by PyTorch and by ONNX Runtime."""

import json
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.cli import export as export_cli
from captioner.cli.train import run
from captioner.data.images import build_transform, load_image
from captioner.export.onnx_runtime import load
from captioner.inference import caption_files
from captioner.models.search import beam_search
from captioner.utils.hydra import compose_config

SIZES = {"num_train": 600, "num_val": 20, "num_test": 50, "image_size": 48}
PRESETS = {
    # the demo's warm-up (100 steps) is longer than this whole run: 20 steps, then cosine
    "lstm": ["experiment=demo", "trainer.max_epochs=6", "scheduler.num_warmup_steps=20"],
    "transformer": ["experiment=transformer", "trainer.max_epochs=4", "data.image_size=48",
                    "model.encoder.return_layer=layer2"],
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from captioner.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic50")
    generate(root, seed=0, **SIZES)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_trained_checkpoint_captions_equal_in_onnx_runtime(preset, data_root, tmp_path):
    cfg = compose_config("train", [
        f"data.root={data_root}", *(f"data.synthetic.{k}={v}" for k, v in SIZES.items()),
        "data.num_workers=0", "trainer.accelerator=cpu", "~logger", "test=false",
        f"threads={torch.get_num_threads()}", *PRESETS[preset],
    ], tmp_path)
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx")]) == 0

    model, tokenizer, payload = load_checkpoint(ckpt)
    onnx = load(tmp_path / "onnx")
    test = json.loads((data_root / "annotations" / "captions_test.json").read_text())
    paths = [data_root / "images" / im["file_name"] for im in test["images"]]
    assert len(paths) == 50
    for decode in ({"method": "greedy"}, {"method": "beam", "beam_size": 3}):
        decode = {**decode, "max_length": 20, "precision": "fp32"}
        want = caption_files(model, tokenizer, paths, payload["image_size"], decode)
        got = caption_files(onnx, onnx.tokenizer, paths, onnx.image_size, decode)
        assert [r["caption"] for r in got] == [r["caption"] for r in want]
    # a trained model says different things about different images
    assert len({r["caption"] for r in want}) > 10

    transform = build_transform(payload["image_size"])
    images = torch.stack([transform(load_image(p)) for p in paths])  # (50, 3, S, S)
    ids = {"bos_id": model.bos_id, "eos_id": model.eos_id, "pad_id": model.pad_id}
    with torch.no_grad():
        _, _, score_pt = beam_search(model.decoder, model.encode(images), beam_size=3, **ids)
    _, _, score_ort = beam_search(onnx.decoder, onnx.encode(images), beam_size=3, **ids)
    assert (score_ort - score_pt).abs().max() < 1e-4
