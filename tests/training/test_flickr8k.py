"""The Flickr8k benchmark: its presets (composed from the real configs) and, with ../shared
present, ``make flickr8k``'s whole chain on a tiny subset of the real photos."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED, benchmark_subset, compose_config

ROOT = Path(__file__).resolve().parents[2]
FLICKR8K = SHARED / "data" / "flickr8k"


@pytest.mark.parametrize("decoder, target", [("flickr8k", "LSTMDecoder"),
                                             ("flickr8k_transformer", "TransformerDecoder")])
def test_flickr8k_presets_compose_and_scst_stage_keeps_the_model(decoder, target, tmp_path):
    ce = compose_config("train", [f"experiment={decoder}"], tmp_path)
    scst = compose_config("train", [f"experiment={decoder}_scst", "init_from=x.ckpt"], tmp_path)
    assert ce.data.cache_features and ce.data.root.endswith("flickr8k")
    assert ce.model.decoder._target_.endswith(target) and not ce.model.encoder.trainable
    assert ce.loss.scst is None and ce.decode.ban_unk and ce.decode.ban_bad_endings
    # init_from loads the cross-entropy weights: the self-critical stage must build the same model
    assert scst.model == ce.model and scst.data == ce.data
    assert scst.loss.scst.baseline == "mean" and scst.init_from == "x.ckpt"
    assert scst.optimizer.lr < ce.optimizer.lr and scst.scheduler is None


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/data/flickr8k absent")
def test_make_flickr8k_chain_on_a_tiny_subset(tmp_path):
    """Cache, cross-entropy, self-critical, selection on val, test: every stage really runs."""
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "scripts/reproduce.py", "flickr8k", "--ce-epochs", "1", "--scst-epochs",
         "1", "--beams", "2", "--length-penalties", "0,1", "--in-process", "--out", str(out), *benchmark_subset("flickr8k", tmp_path, 16),
         "data.min_word_frequency=1", "data.image_size=64", "data.batch_size=8",
         "model.decoder.hidden_size=64", "model.decoder.embed_dim=32",
         "model.decoder.attention_dim=32", "threads=1", f"data.cache_dir={tmp_path / 'cache'}",
         "trainer.limit_train_batches=1.0"],  # (the preset's quarter epoch of 2 batches is none)
        cwd=ROOT, check=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == set(results["val"]) == {"self-critical", "cross-entropy"}
    assert results["chosen_on_val"] in results["val"]
    for name, r in results["test"].items():
        assert {"bleu1", "bleu4", "meteor", "rouge_l", "cider"} <= set(r["metrics"])
        chosen = results["val"][name]
        assert set(chosen["tried"]) == {"beam 2, length penalty 0", "beam 2, length penalty 1"}
        assert r["decode"]["beam_size"] == chosen["decode"]["beam_size"] == 2
        assert r["decode"]["length_penalty"] == chosen["decode"]["length_penalty"]
        assert chosen["metrics"]["cider"] == max(chosen["tried"].values())  # the best on val
    text = (out / "results.md").read_text()
    assert "Show, Attend and Tell, hard attention" in text and "Validation" in text
