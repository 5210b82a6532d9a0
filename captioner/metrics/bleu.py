"""Fast in-process BLEU-1..n, numerically identical to pycocoevalcap's ``Bleu``.

Reproduces pycocoevalcap's choices: the effective reference length of each sentence is the
*closest* reference length (ties -> the shorter one), n-gram matches are clipped by the maximum
count over the references, corpus BLEU pools the counts of all images, and the "smoothing" is
its ``tiny = 1e-15`` / ``small = 1e-9`` constants: ``(correct + tiny) / (guess + small)``, and a
brevity penalty ``exp(1 - 1 / ratio)`` with ``ratio = (testlen + tiny) / (reflen + small)``.
Per-image BLEU-k is computed the same way on that image's counts.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from captioner.metrics.cider import prepare
from captioner.metrics.text import as_hypothesis

_TINY = 1e-15
_SMALL = 1e-9


def bleu_counts(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4):
    """Per-hypothesis (testlen, closest reflen, guess[H, n], correct[H, n]); ``refs[i]`` are
    the references of ``hyps[i]``."""
    H = len(hyps)
    p = prepare(hyps, np.arange(H), refs)
    correct = np.zeros((H, n), dtype=np.int64)
    hyp_of_cell = p.hyp_of_cell()
    for lv in p.levels(n):
        r = np.flatnonzero(lv.is_ref)
        if r.shape[0] == 0:
            continue
        rg = lv.group[r]
        starts = np.flatnonzero(np.concatenate([[True], rg[1:] != rg[:-1]]))
        maxref = np.zeros(lv.group_start.shape[0], dtype=np.int64)
        maxref[rg[starts]] = np.maximum.reduceat(lv.tf[r], starts)
        h = np.flatnonzero(~lv.is_ref)
        clipped = np.minimum(lv.tf[h], maxref[lv.group[h]])
        correct[:, lv.k - 1] = np.bincount(hyp_of_cell[lv.cell[h]], clipped, minlength=H)
    length = p.cell_table(p.lengths)
    testlen = length[p.hcell]
    rcells, rvalid = p.pair_ref_cells()
    rlen = length[rcells].reshape(H, p.rmax)
    # closest reference length, ties broken towards the shorter one: min((|l - t|, l))
    big = np.int64(1) << 40
    keyed = np.where(rvalid.reshape(H, p.rmax),
                     np.abs(rlen - testlen[:, None]) * big + rlen, np.iinfo(np.int64).max)
    reflen = rlen[np.arange(H), np.argmin(keyed, axis=1)] if H else np.zeros(0, np.int64)
    guess = np.maximum(0, testlen[:, None] - np.arange(n)[None, :])
    return testlen, reflen, guess, correct


def _bleu_from_counts(testlen: float, reflen: float, guess, correct, n: int) -> list[float]:
    out = []
    b = 1.0
    for k in range(n):
        b *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        out.append(b ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        out = [v * math.exp(1 - 1 / ratio) for v in out]
    return out


def _per_sentence(testlen, reflen, guess, correct, n: int) -> np.ndarray:
    """(H, n) BLEU-1..n of each hypothesis, vectorised with pycocoevalcap's operation order."""
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)  # brevity
    prod = np.ones(len(testlen))
    cols = []
    for k in range(n):
        prod = prod * ((correct[:, k] + _TINY) / (guess[:, k] + _SMALL))
        cols.append(prod ** (1.0 / (k + 1)) * bp)
    return np.stack(cols, axis=1) if cols else np.zeros((len(testlen), 0))


def sentence_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> np.ndarray:
    """(H, n) BLEU-1..n of each tokenised hypothesis ``hyps[i]`` against ``refs[i]``, as
    pycocoevalcap scores one image (a list, so several hypotheses may share an image)."""
    if not hyps:
        return np.zeros((0, n))
    return _per_sentence(*bleu_counts(list(hyps), [list(r) for r in refs], n), n)


def bleu(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, Any],
         n: int = 4) -> tuple[list[float], dict[Hashable, list[float]]]:
    """Corpus BLEU-1..n and per-image BLEU-1..n, as pycocoevalcap's
    ``Bleu(n).compute_score(refs, hyps)`` (tokenised inputs)."""
    if set(refs.keys()) != set(hyps.keys()):
        raise ValueError("refs and hyps must have the same image ids")
    ids = list(refs.keys())
    if not ids:
        return [0.0] * n, {}
    testlen, reflen, guess, correct = bleu_counts(
        [as_hypothesis(hyps[i]) for i in ids], [list(refs[i]) for i in ids], n)
    per = _per_sentence(testlen, reflen, guess, correct, n).tolist()
    corpus = _bleu_from_counts(float(testlen.sum()), float(reflen.sum()), guess.sum(axis=0),
                               correct.sum(axis=0), n)
    return corpus, dict(zip(ids, per))
