"""The RSICD benchmark's presets (composed from the real configs) and, with ../shared present, its
pipeline end to end on a few batches (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED, benchmark_subset, compose_config

ROOT = Path(__file__).resolve().parents[2]
RSICD = SHARED / "data" / "rsicd"


@pytest.mark.parametrize("decoder", ["rsicd", "rsicd_transformer"])
def test_rsicd_presets_compose_and_scst_stage_keeps_the_model(decoder, tmp_path):
    ce = compose_config("train", [f"experiment={decoder}"], tmp_path)
    scst = compose_config("train", [f"experiment={decoder}_scst", "init_from=x.ckpt"], tmp_path)
    assert ce.data.cache_features and "rsicd" in ce.data.root
    assert ce.model.encoder._target_.endswith("EfficientNetLiteEncoder") and not ce.model.encoder.trainable
    assert ce.trainer.precision == "auto" and ce.loss.scst is None
    # init_from loads the cross-entropy weights: the self-critical stage must build the same model
    assert scst.model == ce.model and scst.data == ce.data
    assert scst.loss.scst.baseline == "greedy" and scst.init_from == "x.ckpt"
    assert scst.optimizer.lr < ce.optimizer.lr and scst.scheduler is None
    assert ce.loss.alpha_c is None  # the decoder's default: doubly stochastic for the LSTM only


@pytest.mark.slow
@pytest.mark.skipif(not RSICD.is_dir(), reason="../shared/data/rsicd absent")
def test_make_rsicd_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "scripts/reproduce.py", "rsicd", "--ce-epochs", "1", "--scst-epochs", "1", "--out",
         str(out), *benchmark_subset("rsicd", tmp_path), "data.min_word_frequency=1",
         f"data.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, check=True)
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"self-critical", "cross-entropy"}
    for name, r in results["test"].items():
        assert {"bleu4", "meteor", "rouge_l", "cider"} <= set(r["metrics"])
        assert r["decode"]["beam_size"] == results["val"][name]["decode"]["beam_size"]
    assert "| system | B-1 |" in (out / "results.md").read_text()
    with pytest.raises(subprocess.CalledProcessError):  # never overwrite a run
        subprocess.run([sys.executable, "scripts/reproduce.py", "rsicd", "--out", str(out)], cwd=ROOT,
                       check=True, capture_output=True)
