"""caption.py with many images, some bad, and with bad arguments, as a user would hit them."""

from pathlib import Path

import pytest
from PIL import Image

from captioner.checkpoint import build_model, save_checkpoint
from captioner.cli import caption as caption_cli
from captioner.data.tokenizer import train_tokenizer, with_vocabulary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained but complete checkpoint: enough to caption (training is not the point)."""
    tok = train_tokenizer(["a red square", "a blue circle"])
    config = with_vocabulary({
        "_target_": "captioner.models.captioner.Captioner",
        "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                    "return_layer": "layer2"},
        "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                    "embed_dim": 16, "hidden_size": 32, "attention_dim": 16}}, tok)
    model = build_model(config)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return save_checkpoint(path, model, config, tok, {"method": "greedy", "max_length": 5}, 32)


def test_every_good_image_is_captioned_and_every_bad_one_named(tmp_path, checkpoint, capsys):
    good = [tmp_path / "good.png", tmp_path / "other.png"]
    for p in good:
        Image.new("RGB", (20, 20), "red").save(p)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "missing.jpg"
    args = [str(good[0]), str(broken), str(good[1]), str(missing), str(tmp_path)]
    code = caption_cli.main([*args, "--checkpoint", str(checkpoint), "--batch-size", "1"])
    out, err = capsys.readouterr()
    assert code == 2  # some failed
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in good]
    errors = err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert [e.split(": ")[1] for e in errors] == [str(broken), str(missing), str(tmp_path)]
    assert caption_cli.main([str(good[0]), "--checkpoint", str(checkpoint)]) == 0


@pytest.mark.parametrize("option, value", [
    ("--beam-size", "0"), ("--batch-size", "0"), ("--batch-size", "-3"), ("--max-length", "0"),
    ("--beam-size", "abc"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        caption_cli.main([str(tmp_path / "a.png"), option, value])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert f"argument {option}: invalid integer >= 1 value: '{value}'" in err
