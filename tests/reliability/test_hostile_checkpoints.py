"""A checkpoint someone sent you: its stored model config must never run anything but the model
classes. Each hostile config names a file that the attack would write; it must stay absent."""

from pathlib import Path

import pytest
import torch

from captioner.checkpoint import FORMAT_VERSION, KEY, CheckpointError, load_checkpoint
from captioner.cli import caption as caption_cli
from captioner.training.init_from import InitFromCheckpoint

WRITE = "captioner.utils.io.atomic_write_json"  # a project function that writes any file
ENCODER = {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18"}
DECODER = {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True}


def hostile_configs(victim: Path) -> dict[str, dict]:
    attack = {"_target_": WRITE, "path": str(victim), "obj": "owned"}
    ids = {"vocab_size": 10, "pad_id": 0, "bos_id": 1, "eos_id": 2}

    def captioner(encoder=ENCODER, decoder=DECODER, **extra):
        return {"_target_": "captioner.models.captioner.Captioner", "encoder": encoder,
                "decoder": decoder, **ids, **extra}

    return {
        "function as target": attack,
        "function as encoder": captioner(encoder=attack),
        "nested in encoder": captioner(encoder={**ENCODER, "name": attack}),
        "nested in decoder": captioner(decoder={**DECODER, "attention": attack}),
        "nested in a list": captioner(decoder={**DECODER, "dropout": [attack]}),
        "positional _args_": {"_target_": "captioner.models.captioner.Captioner", "_args_": [attack]},
        "_args_ in encoder": captioner(encoder={**ENCODER, "_args_": [attack]}),
        "_partial_ function": {**attack, "_partial_": True},
        "_partial_ encoder": captioner(encoder={**ENCODER, "_partial_": True}),
        "attribute path to os": captioner(encoder={"_target_": "captioner.utils.io.os.system",
                                                    "_args_": [f"touch {victim}"]}),
        "attribute path via model module": captioner(
            encoder={"_target_": "captioner.models.encoder.torch.save", "obj": 1, "f": str(victim)}),
        "_recursive_ and _convert_": captioner(_recursive_=False, _convert_="all"),
        "unknown argument": captioner(decoder={**DECODER, "callback": "x"}),
        "not a mapping": ["captioner.models.captioner.Captioner"],
    }


def write_checkpoint(path: Path, model_config) -> Path:
    payload = {"format_version": FORMAT_VERSION, "model_config": model_config, "tokenizer": "{}",
               "decode": {}, "image_size": 32}
    torch.save({"state_dict": {}, KEY: payload}, path)
    return path


def test_the_attack_is_real_under_plain_instantiate(tmp_path):
    from hydra.utils import instantiate

    victim = tmp_path / "owned.txt"
    instantiate(hostile_configs(victim)["function as target"])
    assert victim.exists()  # what the checks below prevent


@pytest.mark.parametrize("name", list(hostile_configs(Path("x"))))
def test_hostile_model_config_is_refused_calling_nothing(tmp_path, name):
    victim = tmp_path / "owned.txt"
    ckpt = write_checkpoint(tmp_path / "sent.ckpt", hostile_configs(victim)[name])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert not victim.exists()
    message = str(e.value)
    assert "\n" not in message and str(ckpt) in message and "model" in message


def test_caption_cli_and_init_from_refuse_it_in_one_line(tmp_path, capsys):
    victim = tmp_path / "owned.txt"
    ckpt = write_checkpoint(tmp_path / "sent.ckpt", hostile_configs(victim)["nested in encoder"])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert caption_cli.main([str(image), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.encoder.name" in err
    with pytest.raises(CheckpointError, match="model.encoder.name"):
        InitFromCheckpoint(str(ckpt)).setup(None, None, "fit")
    assert not victim.exists()
