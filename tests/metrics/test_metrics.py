"""Caption metrics: in-process BLEU / CIDEr-D vs pycocoevalcap, the evaluation report, its
Java-missing / SPICE-offline / Java-failure paths, and the fixed-corpus CIDEr-D scorer."""

from __future__ import annotations

import contextlib
import io
import math
import random
import shutil
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from captioner.metrics import coco_eval
from captioner.metrics.bleu import bleu
from captioner.metrics.cider import CiderD, cider_d
from captioner.metrics.coco_eval import JavaMetricError, evaluate_captions
from captioner.metrics.text import tokenize

pycoco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not installed")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def coco_cider(refs, hyps):
    score, scores = pycoco_cider.Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    return float(score), dict(zip(refs.keys(), map(float, scores)))


def coco_bleu(refs, hyps):
    with contextlib.redirect_stdout(io.StringIO()):
        score, scores = pycoco_bleu.Bleu(4).compute_score(
            refs, {k: [v] for k, v in hyps.items()})
    return score, {k: [scores[n][j] for n in range(4)] for j, k in enumerate(refs.keys())}


def random_corpus(seed: int, n_img: int, vocab_size: int = 200, max_refs: int = 6):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]

    def sent(lo, hi):
        sub = vocab[: rng.choice([4, 30, vocab_size])]  # small sub-vocabularies -> repeats
        return " ".join(rng.choice(sub) for _ in range(rng.randint(lo, hi)))

    refs = {f"im{i}": [sent(1, 16) for _ in range(rng.randint(1, max_refs))]
            for i in range(n_img)}
    hyps = {k: sent(0, 20) for k in refs}
    return refs, hyps


EDGE_REFS = {
    "empty_hyp": ["a dog runs on the beach", "a brown dog running"],
    "long_hyp": ["a cat", "the cat sits"],
    "single_ref": ["a man riding a horse on a trail"],
    "repeats": ["a a a a b b", "a b a b a b", "b b b"],
    "identical": ["two people walking down a street", "people walk on a road"],
    "one_word": ["dog", "a dog"],
    "dup_refs": ["a red bus", "a red bus", "a red bus"],
}
EDGE_HYPS = {
    "empty_hyp": "",
    "long_hyp": "a cat sits on a mat next to a dog and a cat and another cat in the sun today",
    "single_ref": "a man rides a horse",
    "repeats": "a a a a a a a b",
    "identical": "two people walking down a street",
    "one_word": "dog",
    "dup_refs": "a red bus",
}


def assert_cider_equal(refs, hyps, tol=1e-6):
    exp, exp_per = coco_cider(refs, hyps)
    got, got_per = cider_d(refs, hyps)
    assert got == pytest.approx(exp, abs=tol)
    assert set(got_per) == set(exp_per)
    for k in exp_per:
        assert got_per[k] == pytest.approx(exp_per[k], abs=tol), k


def assert_bleu_equal(refs, hyps, tol=1e-6):
    exp, exp_per = coco_bleu(refs, hyps)
    got, got_per = bleu(refs, hyps)
    np.testing.assert_allclose(got, exp, atol=tol, rtol=0)
    for k in exp_per:
        np.testing.assert_allclose(got_per[k], exp_per[k], atol=tol, rtol=0, err_msg=str(k))


# ---------------------------------------------------------------------------------------------
# in-process CIDEr-D / BLEU == pycocoevalcap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,n_img", [(0, 1), (1, 2), (2, 7), (3, 40), (4, 150), (5, 400)])
def test_cider_matches_pycocoevalcap_random(seed, n_img):
    assert_cider_equal(*random_corpus(seed, n_img))


@pytest.mark.parametrize("seed,n_img", [(10, 1), (11, 3), (12, 25), (13, 150), (14, 400)])
def test_bleu_matches_pycocoevalcap_random(seed, n_img):
    assert_bleu_equal(*random_corpus(seed, n_img))


def test_cider_and_bleu_edge_cases():
    assert_cider_equal(EDGE_REFS, EDGE_HYPS)
    assert_bleu_equal(EDGE_REFS, EDGE_HYPS)
    # each edge case alone (single image: IDF is log(1) = 0 -> CIDEr 0) and in pairs
    keys = list(EDGE_REFS)
    for i, k in enumerate(keys):
        for sub in ([k], [k, keys[(i + 1) % len(keys)]]):
            r = {s: EDGE_REFS[s] for s in sub}
            h = {s: EDGE_HYPS[s] for s in sub}
            assert_cider_equal(r, h)
            assert_bleu_equal(r, h)


def test_cider_sigma_parameter():
    # (pycocoevalcap's Cider(n != 4) crashes: its CiderScorer always cooks 4-grams)
    refs, hyps = random_corpus(21, 30)
    for sigma in (1.0, 3.0, 20.0):
        exp = pycoco_cider.Cider(sigma=sigma).compute_score(
            refs, {k: [v] for k, v in hyps.items()})[0]
        assert cider_d(refs, hyps, sigma=sigma)[0] == pytest.approx(exp, abs=1e-6)


def test_cider_accepts_list_hypotheses_and_checks_ids():
    refs, hyps = random_corpus(3, 5)
    assert cider_d(refs, {k: [v] for k, v in hyps.items()})[0] == cider_d(refs, hyps)[0]
    with pytest.raises(ValueError):
        cider_d(refs, dict(list(hyps.items())[:-1]))
    assert cider_d({}, {}) == (0.0, {})


# ---------------------------------------------------------------------------------------------
# fixed-corpus CIDEr-D scorer
# ---------------------------------------------------------------------------------------------


def _reference_cider(hyp: str, refs: list[str], df: Counter, log_n: float, n=4, sigma=6.0):
    """Straightforward re-implementation of pycocoevalcap's per-image formula."""

    def vec(s):
        w = s.split()
        cnt = Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))
        v = [{} for _ in range(n)]
        for g, tf in cnt.items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in d.values())) for d in v]
        return v, norms, max(len(w) - 1, 0)

    vh, nh, lh = vec(hyp)
    total = 0.0
    for r in refs:
        vr, nr, lr = vec(r)
        pen = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        for k in range(n):
            val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
            if nh[k] and nr[k]:
                val /= nh[k] * nr[k]
            total += val * pen
    return total / n / len(refs) * 10.0


def test_ciderd_scorer_equals_cider_d_when_corpus_is_refs():
    refs, hyps = random_corpus(7, 60)
    ids = list(refs)
    _, per = cider_d(refs, hyps)
    got = CiderD(refs).score([hyps[i] for i in ids], [refs[i] for i in ids])
    np.testing.assert_allclose(got, [per[i] for i in ids], atol=1e-9, rtol=0)
    # also as a list of reference lists, and with the edge cases
    got = CiderD(list(EDGE_REFS.values())).score(list(EDGE_HYPS.values()),
                                                 list(EDGE_REFS.values()))
    _, per = cider_d(EDGE_REFS, EDGE_HYPS)
    np.testing.assert_allclose(got, list(per.values()), atol=1e-9, rtol=0)


def test_ciderd_scorer_many_samples_per_image():
    refs, _ = random_corpus(8, 30)
    ids = list(refs)
    samples = [random_corpus(100 + q, 30)[1] for q in range(4)]  # 4 samples per image
    scorer = CiderD(refs)
    hyps, hrefs = [], []
    for i in ids:  # interleaved order, shared reference-list objects
        for q in range(4):
            hyps.append(samples[q][f"im{ids.index(i)}"])
            hrefs.append(refs[i])
    got = scorer.score(hyps, hrefs).reshape(len(ids), 4)
    for q in range(4):
        _, per = cider_d(refs, {i: samples[q][f"im{j}"] for j, i in enumerate(ids)})
        np.testing.assert_allclose(got[:, q], [per[i] for i in ids], atol=1e-9, rtol=0)


def test_ciderd_scorer_with_larger_corpus_and_unseen_words():
    corpus, _ = random_corpus(9, 80)
    rng = random.Random(5)
    ids = list(corpus)[:20]
    hyps = []
    for j, i in enumerate(ids):
        w = corpus[i][0].split() + [f"unseen{j % 3}"] * (j % 3) + ["w1", "w2"]
        rng.shuffle(w)
        hyps.append(" ".join(w))
    hyps[0] = ""
    refs = [corpus[i] for i in ids]
    df = Counter()
    for rs in corpus.values():
        for g in {tuple(s.split()[a:a + k]) for s in rs for k in range(1, 5)
                  for a in range(len(s.split()) - k + 1)}:
            df[g] += 1
    exp = [_reference_cider(h, r, df, math.log(len(corpus))) for h, r in zip(hyps, refs)]
    scorer = CiderD(corpus)
    np.testing.assert_allclose(scorer.score(hyps, refs), exp, atol=1e-9, rtol=0)
    # unseen words must not leak into the scorer's vocabulary / change later results
    np.testing.assert_allclose(scorer.score(hyps, refs), exp, atol=1e-9, rtol=0)
    assert scorer.score([], []).shape == (0,)


# ---------------------------------------------------------------------------------------------
# pure-Python tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs (brown) play in the \"park\" -- don't they?",
     "two dogs -lrb- brown -rrb- play in the park do n't they"),
    ("The cat's toy isn't here!", "the cat 's toy is n't here"),
    ("Dinner on a plate: rice & broccoli.", "dinner on a plate rice & broccoli"),
    ("kids' toys, and a 9-year-old's bike...", "kids toys and a 9-year-old 's bike"),
    ("A   STOP sign\non a pole", "a stop sign on a pole"),
])
def test_python_tokenize(raw, expected):
    assert tokenize(raw) == expected


# ---------------------------------------------------------------------------------------------
# full report
# ---------------------------------------------------------------------------------------------

FIXED_REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surf board riding a wave.", "Man surfing on a big wave.",
        "A surfer is catching a wave."],
    2: ["Two dogs playing with a frisbee in the park.",
        "Two brown dogs chase a red frisbee on the grass.",
        "Dogs running in a field after a frisbee."],
    "img3": ["A plate of food with broccoli and rice.",
             "A white plate topped with rice, meat and broccoli.",
             "Dinner on a plate: rice & broccoli."],
    4: ["A red double-decker bus driving down a city street.", "A bus on the road (in London)."],
    5: ["A cat sleeping on a laptop keyboard.", "The cat's asleep on the computer.",
        "A kitten lying on top of a laptop.", "A grey cat napping on a keyboard."],
}
FIXED_HYPS = {1: "A man riding a wave on a surfboard.", 2: "Two dogs are playing with a frisbee.",
              "img3": "A plate of rice and broccoli.", 4: "A red bus driving down the street.",
              5: "A cat laying on a laptop computer."}
# computed once with pycocoevalcap 1.2 (PTBTokenizer + Bleu/Meteor/Rouge/Cider)
FIXED_EXPECTED = {
    "bleu1": 0.8173420197177519, "bleu2": 0.6872824423707401, "bleu3": 0.5282550330201946,
    "bleu4": 0.39983399322781243, "meteor": 0.3546737933964476, "rouge_l": 0.7417124263888761,
    "cider": 2.1227541184955583,
}


def _package_files():
    root = coco_eval._package_dir()
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


@needs_java
def test_evaluate_captions_pinned_values():
    before = _package_files()
    rep = evaluate_captions(FIXED_REFS, FIXED_HYPS)
    assert set(rep.metrics) == set(FIXED_EXPECTED)
    for k, v in FIXED_EXPECTED.items():
        assert rep.metrics[k] == pytest.approx(v, abs=1e-4), k
    assert rep.skipped == {}
    assert set(rep.per_image) == set(FIXED_REFS)
    assert all("cider" in d and "meteor" in d for d in rep.per_image.values())
    assert np.mean([d["cider"] for d in rep.per_image.values()]) == pytest.approx(
        rep.metrics["cider"])
    # nothing is written into the (possibly read-only) pycocoevalcap package directory
    assert _package_files() == before


def test_evaluate_captions_without_java(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with caplog.at_level("WARNING"):
        rep = evaluate_captions(FIXED_REFS, FIXED_HYPS, spice=True)
    assert set(rep.metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    assert "meteor" in rep.skipped and "java" in rep.skipped["meteor"].lower()
    assert "spice" in rep.skipped
    assert rep.tokenizer == "python"
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    # the Python tokenizer agrees with the PTB one on these captions
    for k in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert rep.metrics[k] == pytest.approx(FIXED_EXPECTED[k], abs=1e-4), k


@needs_java
def test_spice_offline_is_skipped_not_crashing():
    rep = evaluate_captions(FIXED_REFS, FIXED_HYPS, spice=True)
    assert "spice" in rep.metrics or "spice" in rep.skipped
    if "spice" in rep.skipped:
        assert rep.skipped["spice"] and "\n" not in rep.skipped["spice"]
    for k in FIXED_EXPECTED:
        assert k in rep.metrics


def _fake_java(tmp_path, fail_on: str) -> str:
    real = shutil.which("java")
    script = tmp_path / "java"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *{fail_on}*) echo "fake java: something broke in {fail_on}" >&2; '
        "exit 3;; esac\n"
        f'exec "{real}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@needs_java
@pytest.mark.parametrize("fail_on,metric", [("PTBTokenizer", "PTB tokenizer"),
                                            ("meteor", "METEOR")])
def test_java_failure_raises_with_stderr(tmp_path, monkeypatch, fail_on, metric):
    java = _fake_java(tmp_path, fail_on)
    monkeypatch.setattr(coco_eval, "find_java", lambda: java)
    with pytest.raises(JavaMetricError) as ei:
        evaluate_captions(FIXED_REFS, FIXED_HYPS)
    msg = str(ei.value)
    assert metric in msg and f"something broke in {fail_on}" in msg
    coco_eval.close_meteor()


def test_evaluate_captions_input_validation():
    with pytest.raises(ValueError):
        evaluate_captions({1: ["a dog"]}, {2: "a dog"})
    with pytest.raises(ValueError):
        evaluate_captions({1: []}, {1: "a dog"})


def test_bench_script_imports():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_metrics.py"
    spec = importlib.util.spec_from_file_location("bench_metrics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main)


@needs_java
@pytest.mark.slow
def test_read_only_site_packages(tmp_path):
    """Evaluation works when pycocoevalcap's directory is read-only (bind-mounted ro in a
    private mount namespace; skipped where that is not permitted)."""
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    pkg = coco_eval._package_dir()
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_metrics import FIXED_REFS, FIXED_HYPS, FIXED_EXPECTED\n"
        "from captioner.metrics.coco_eval import evaluate_captions\n"
        "m = evaluate_captions(FIXED_REFS, FIXED_HYPS).metrics\n"
        "assert all(abs(m[k] - v) < 1e-4 for k, v in FIXED_EXPECTED.items()), m\n"
        "print('OK')\n"
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    cmd = (f"mount --bind {pkg} {pkg} && mount -o remount,bind,ro {pkg} || exit 77; "
           f"if touch {pkg}/.rw_probe 2>/dev/null; then rm -f {pkg}/.rw_probe; exit 77; fi; "
           f"exec {sys.executable} {script}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                          timeout=300, check=False, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip("cannot create a read-only mount here")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
