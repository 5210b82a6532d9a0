"""End to end on the tiny embedded set: train -> checkpoint -> caption.py / evaluate.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import caption as caption_cli
from captioner.cli.train import run as train_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    from conftest import TINY_DATA, TINY_MODEL, compose_config

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", [
        f"data.root={synthetic_root}", *TINY_DATA, *TINY_MODEL, "trainer.accelerator=cpu",
        "trainer.max_epochs=2", "trainer.limit_train_batches=2", "decode.beam_size=2",
    ], out)
    metrics = train_run(cfg)
    return out, metrics


def test_train_writes_checkpoints_logs_and_metrics(trained):
    out, metrics = trained
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")  # saved with the run
    assert tok.pad_token == "<pad>" and len(tok) > 10
    for key in ("train/loss", "val/loss", "val/cider", "val/bleu4", "test/cider", "test/bleu4"):
        assert key in metrics, key
    assert metrics["val/num_images"] == 8 and metrics["test/num_images"] == 8


def test_caption_cli_uses_checkpoint_on_a_png(trained, tmp_path, capsys):
    out, _ = trained
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (50, 40), colour).save(tmp_path / f"img{i}.png")
    pic = tmp_path / "attention.png"
    code = caption_cli.main([str(tmp_path / "img0.png"), str(tmp_path / "img1.png"),
                             "--checkpoint", str(out / "checkpoints" / "best.ckpt"),
                             "--beam-size", "2", "--attention", str(pic)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "img0.png"))
    assert Image.open(pic).format == "PNG"


def test_caption_cli_errors_name_the_file(trained, tmp_path, capsys):
    out, _ = trained
    ckpt = str(out / "checkpoints" / "best.ckpt")
    assert caption_cli.main([str(tmp_path / "nope.jpg"), "--checkpoint", ckpt]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert caption_cli.main([str(tmp_path), "--checkpoint", ckpt]) == 2
    assert "directory" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert caption_cli.main([str(tmp_path / "x.png"), "--checkpoint", str(bad)]) == 2
    assert "bad.ckpt" in capsys.readouterr().err


def test_evaluate_writes_results_and_metrics(trained, synthetic_root, tmp_path):
    from conftest import eval_config

    from captioner.cli.evaluate import run as eval_run

    out, _ = trained
    cfg = eval_config(out / "checkpoints" / "best.ckpt", synthetic_root, tmp_path,
                      "decode.beam_size=2")
    metrics = eval_run(cfg, tmp_path)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= metrics["cider"] <= 10.0
    results = json.loads((tmp_path / "results_test.json").read_text())
    assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}
    report = json.loads((tmp_path / "metrics_test.json").read_text())
    assert report["decode"]["beam_size"] == 2 and report["metrics"] == metrics
    per_image = json.loads((tmp_path / "per_image_test.json").read_text())
    assert len(per_image) == 8 and "cider" in per_image[0] and per_image[0]["references"]


def test_debug_preset_runs_fast_dev_run(train_cfg):
    metrics = train_run(train_cfg("debug=fast"))
    assert "train/loss" in metrics


def test_unknown_config_key_fails_with_hydra_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer.not_a_key=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "not_a_key" in proc.stderr


def test_print_composed_config(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job",
                           "model.decoder.hidden_size=256", "trainer.max_epochs=3"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hidden_size: 256" in proc.stdout and "max_epochs: 3" in proc.stdout


def test_evaluate_and_caption_take_an_ensemble(trained, synthetic_root, tmp_path, capsys):
    """``ckpt_path=[A,B]`` and ``--checkpoint A --checkpoint B``: one ensemble; two checkpoints
    of one run share its encoder, so the ensemble reads the same input and grid."""
    from conftest import eval_config

    from captioner.cli.evaluate import run as eval_run

    out, _ = trained
    best, last = out / "checkpoints" / "best.ckpt", out / "checkpoints" / "last.ckpt"
    cfg = eval_config(f"[{best},{last}]", synthetic_root, tmp_path, "decode.beam_size=2")
    metrics = eval_run(cfg, tmp_path)
    report = json.loads((tmp_path / "metrics_test.json").read_text())
    assert report["checkpoint"] == [str(best.resolve()), str(last.resolve())]
    assert report["metrics"] == metrics and report["num_images"] == 8
    Image.new("RGB", (50, 40), "red").save(tmp_path / "img.png")
    code = caption_cli.main([str(tmp_path / "img.png"), "--checkpoint", str(best),
                             "--checkpoint", str(last), "--beam-size", "2"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(str(tmp_path / "img.png"))
