"""Wrong config values, as a user types them: one line naming the key and what is allowed, before
any work, and exit status 2 from the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from captioner.cli.train import run as train_run
from captioner.utils.config_schema import EVALUATE, TRAIN, ConfigValueError, check_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, key, allowed", [
    ("trainer.max_epochs=abc", "trainer.max_epochs", "an integer >= 1 or -1"),
    ("trainer.max_epochs=0", "trainer.max_epochs", "an integer >= 1 or -1"),
    ("seed=abc", "seed", "an integer"),
    ("data.batch_size=0", "data.batch_size", "an integer >= 1"),
    ("data.batch_size=-4", "data.batch_size", "an integer >= 1"),
    ("data.batch_size=2.5", "data.batch_size", "an integer >= 1"),
    ("data.captions_per_image=0", "data.captions_per_image", "an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers", "an integer >= 0"),
    ("val_decode.max_length=0", "val_decode.max_length", "an integer >= 1"),
    ("decode.beam_size=0", "decode.beam_size", "an integer >= 1"),
    ("decode.method=sample", "decode.method", "one of greedy, beam"),
    ("decode.precision=fp8", "decode.precision", "one of auto, fp32, bf16, fp16, null"),
    ("optimizer.lr=-1", "optimizer.lr", "a number > 0"),
    ("optimizer.lr=abc", "optimizer.lr", "a number > 0"),
    ("trainer.precision=8-true", "trainer.precision", "one of auto, 32-true"),
    ("+threads=0", "threads", "an integer >= 1 or null"),
    ("loss.label_smoothing=1.5", "loss.label_smoothing", "a number >= 0 and < 1"),
    ("data.skip_bad_images=maybe", "data.skip_bad_images", "one of True, False"),
])
def test_bad_training_values_name_the_key(tmp_path, override, key, allowed):
    cfg = compose_config("train", [override], tmp_path)
    with pytest.raises(ConfigValueError) as e:
        check_config(cfg, TRAIN)
    assert str(e.value).startswith(f"config {key}=") and allowed in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "trainer.precision=auto",
                                      "trainer.precision=32", "+threads=4", "+threads=null", "decode.precision=auto",
                                      "trainer.max_epochs=-1", "optimizer.lr=1e-3"])
def test_good_values_pass(tmp_path, override):
    check_config(compose_config("train", [override], tmp_path), TRAIN)


def test_evaluate_values_are_checked(tmp_path):
    base = ["ckpt_path=x.ckpt"]
    check_config(compose_config("eval", base, tmp_path), EVALUATE)
    with pytest.raises(ConfigValueError, match="config decode.beam_size=0"):
        check_config(compose_config("eval", [*base, "decode.beam_size=0"], tmp_path), EVALUATE)
    with pytest.raises(ConfigValueError, match="config batch_size=0"):
        check_config(compose_config("eval", [*base, "batch_size=0"], tmp_path), EVALUATE)


def test_training_refuses_a_bad_test_beam_before_training(train_cfg, monkeypatch):
    import captioner.data.datamodule as dm

    monkeypatch.setattr(dm.CaptionDataModule, "prepare_data",
                        lambda self: pytest.fail("work started before the config was checked"))
    with pytest.raises(ConfigValueError, match="decode.beam_size"):
        train_run(train_cfg("decode.beam_size=0"))


def test_cli_bad_value_and_unknown_key_exit_2_in_one_line_creating_nothing(tmp_path):
    for args, needle in [(["trainer.max_epochs=abc"], "config trainer.max_epochs='abc'"),
                         (["trainer.not_a_key=1"], "not_a_key")]:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "outputs").exists()
        if args == ["trainer.max_epochs=abc"]:
            assert proc.stderr.strip().count("\n") == 0  # one line
