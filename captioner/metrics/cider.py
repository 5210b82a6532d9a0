"""Fast in-process CIDEr-D (numerically identical to pycocoevalcap's ``Cider``).

pycocoevalcap's ``Cider`` is really CIDEr-D: TF-IDF weighted n-gram vectors (n = 1..4) with
IDF from the references of the evaluated corpus, clipped cosine similarity
``sum min(v_hyp, v_ref) * v_ref / (|v_hyp| |v_ref|)``, a Gaussian length penalty
``exp(-(l_hyp - l_ref)^2 / (2 sigma^2))`` and a factor 10.  Quirk reproduced here: the "length"
in the penalty is the number of *bigrams* of a sentence (``max(0, len - 1)``), not its number of
words, because pycocoevalcap counts lengths at n-gram index 1.

Everything is vectorised with numpy (see :mod:`captioner.metrics.text`); there is no per-pair
Python loop.

* :func:`cider_d` -- corpus CIDEr-D, IDF from the evaluated references (validation / test).
* :class:`CiderD` -- IDF from a fixed reference corpus (e.g. the training set) computed once;
  ``.score(hyps, refs)`` scores many hypotheses (several per image) at once: the self-critical
  reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.metrics.text import Level, Vocab, as_hypothesis, ngram_levels, split_sentences


@dataclass
class Prepared:
    """Hypotheses and their (grouped) references as flat word-id arrays.

    Every sentence has a *cell* ``image * J + slot`` (``J = kmax + rmax``): hypothesis ``q`` of
    an image has slot ``q``, its reference ``r`` has slot ``kmax + r``.  Sentences are laid
    out in cell order (image by image, hypotheses before references).
    """

    H: int
    I: int
    kmax: int
    rmax: int
    himg: np.ndarray  # image of each hypothesis
    hcell: np.ndarray  # cell of each hypothesis
    nref: np.ndarray  # references per image
    cell_of_sent: np.ndarray  # cell of each laid-out sentence (increasing)
    lengths: np.ndarray  # tokens per laid-out sentence
    words: np.ndarray  # flat 1-based word ids
    vocab_size: int

    @property
    def J(self) -> int:
        return self.kmax + self.rmax

    def levels(self, n: int) -> Iterator[Level]:
        return ngram_levels(self.lengths, self.words, self.vocab_size, self.cell_of_sent,
                            self.J, self.kmax, n)

    def cell_table(self, values: np.ndarray, fill: int = 0) -> np.ndarray:
        """Per-sentence values scattered to a per-cell array."""
        out = np.full(self.I * self.J, fill, dtype=np.asarray(values).dtype)
        out[self.cell_of_sent] = values
        return out

    def hyp_of_cell(self) -> np.ndarray:
        out = np.full(self.I * self.J, -1, dtype=np.int64)
        out[self.hcell] = np.arange(self.H)
        return out

    def pair_ref_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """[H * rmax] cell of every (hypothesis, reference slot) pair and its validity."""
        r = np.arange(self.rmax)
        cells = (self.himg * self.J + self.kmax)[:, None] + r[None, :]
        valid = r[None, :] < self.nref[self.himg][:, None]
        return cells.ravel(), valid.ravel()


def prepare(hyps: Sequence[str], himg: Sequence[int] | np.ndarray,
            refs: Sequence[Sequence[str]], vocab: Vocab | None = None) -> Prepared:
    """``hyps[i]`` is a hypothesis of image ``himg[i]`` whose references are ``refs[himg[i]]``."""
    vocab = vocab if vocab is not None else Vocab()
    himg = np.asarray(himg, dtype=np.int64)
    H, I = len(hyps), len(refs)
    nref = np.fromiter(map(len, refs), dtype=np.int64, count=I)
    if I and nref.min() < 1:
        raise ValueError("every image needs at least one reference")
    counts = np.bincount(himg, minlength=I) if H else np.zeros(I, np.int64)
    kmax = max(int(counts.max()) if I else 1, 1)
    rmax = int(nref.max()) if I else 1
    J = kmax + rmax
    # index of each hypothesis among the hypotheses of its image
    order = np.argsort(himg, kind="stable")
    first = np.zeros(I, dtype=np.int64)
    if I > 1:
        np.cumsum(counts[:-1], out=first[1:])
    hslot = np.empty(H, dtype=np.int64)
    hslot[order] = np.arange(H) - first[himg[order]]
    hcell = himg * J + hslot
    ref_img = np.repeat(np.arange(I, dtype=np.int64), nref)
    ref_start = np.zeros(I, dtype=np.int64)
    if I > 1:
        np.cumsum(nref[:-1], out=ref_start[1:])
    rcell = ref_img * J + kmax + np.arange(ref_img.shape[0]) - ref_start[ref_img]
    cells = np.concatenate([hcell, rcell])
    layout = np.argsort(cells)
    sentences = list(hyps)
    for r in refs:
        sentences.extend(r)
    lengths, words = split_sentences([sentences[i] for i in layout.tolist()], vocab)
    return Prepared(H, I, kmax, rmax, himg, hcell, nref, cells[layout], lengths, words,
                    len(vocab))


def pair_expand(lv: Level) -> tuple[np.ndarray, np.ndarray]:
    """All (hypothesis entry, reference entry) index pairs sharing an (n-gram, image) group."""
    is_hyp = ~lv.is_ref
    nh = np.bincount(lv.group, weights=is_hyp, minlength=lv.group_start.shape[0]).astype(
        np.int64)
    re = np.flatnonzero(lv.is_ref)
    g = lv.group[re]
    cnt = nh[g]
    total = int(cnt.sum())
    ref_e = np.repeat(re, cnt)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    hyp_e = np.repeat(lv.group_start[g], cnt) + offs  # hypotheses come first in a group
    return hyp_e, ref_e


def _cider_scores(p: Prepared, n: int, sigma: float, log_n: float,
                  df_fn: Callable[[Level], np.ndarray]) -> np.ndarray:
    """Per-hypothesis CIDEr-D; ``df_fn(level)`` gives the document frequency of each entry."""
    H, R, C = p.H, p.rmax, p.I * p.J
    hyp_of_cell = p.hyp_of_cell()
    pair_rcell, pair_valid = p.pair_ref_cells()
    pair_hcell = np.repeat(p.hcell, R)
    total = np.zeros(H * R, dtype=np.float64)
    for lv in p.levels(n):
        w = lv.tf * (log_n - np.log(np.maximum(1.0, df_fn(lv))))
        norm = np.sqrt(np.bincount(lv.cell, w * w, minlength=C).astype(np.float64))
        hyp_e, ref_e = pair_expand(lv)
        wr = w[ref_e]
        contrib = np.minimum(w[hyp_e], wr) * wr
        pair = hyp_of_cell[lv.cell[hyp_e]] * R + (lv.slot[ref_e] - p.kmax)
        acc = np.bincount(pair, contrib, minlength=H * R).astype(np.float64)
        den = norm[pair_hcell] * norm[pair_rcell]
        nz = den != 0
        acc[nz] /= den[nz]
        total += acc
    if n >= 2:  # pycocoevalcap's "length" is the number of bigrams
        length = p.cell_table(np.maximum(p.lengths - 1, 0))
    else:
        length = np.zeros(C, dtype=np.int64)
    delta = (length[pair_hcell] - length[pair_rcell]).astype(np.float64)
    pen = np.exp(-(delta ** 2) / (2 * sigma ** 2))
    per = np.where(pair_valid, total * pen, 0.0).reshape(H, R).sum(axis=1)
    return per / n / p.nref[p.himg] * 10.0


def cider_d(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, Any], n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr-D exactly as pycocoevalcap's ``Cider().compute_score(refs, hyps)``.

    ``refs``: image id -> list of tokenised reference strings; ``hyps``: image id -> tokenised
    hypothesis string (a one-element list is accepted too).  Returns (corpus score, per-image
    scores), on pycocoevalcap's 0-10 scale.
    """
    if set(refs.keys()) != set(hyps.keys()):
        raise ValueError("refs and hyps must have the same image ids")
    ids = list(refs.keys())
    if not ids:
        return 0.0, {}
    p = prepare([as_hypothesis(hyps[i]) for i in ids], np.arange(len(ids)),
                [list(refs[i]) for i in ids])
    scores = _cider_scores(p, n, sigma, math.log(float(len(ids))), Level.ref_doc_freq)
    return float(np.mean(scores)), dict(zip(ids, scores.tolist()))


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus (computed once).

    ``refs_corpus``: list of reference lists (one per image) or a mapping image id -> list, all
    already tokenised.  ``score(hyps, refs)`` returns a float64 array with one CIDEr-D per
    hypothesis, where ``refs[i]`` are the references of ``hyps[i]``; hypotheses that share the
    same reference list (same object or same content) are grouped, so scoring several samples
    per image costs little more than one.
    With ``refs_corpus`` equal to the evaluated references this equals :func:`cider_d`.
    """

    def __init__(self, refs_corpus: Sequence[Sequence[str]] | Mapping[Any, Sequence[str]],
                 n: int = 4, sigma: float = 6.0) -> None:
        if isinstance(refs_corpus, Mapping):
            refs_corpus = list(refs_corpus.values())
        refs_corpus = [list(r) for r in refs_corpus]
        self.n, self.sigma = n, sigma
        self.num_images = len(refs_corpus)
        self.log_n = math.log(float(max(self.num_images, 1)))
        self.vocab = Vocab()
        sentences = [s for r in refs_corpus for s in r]
        lengths, words = split_sentences(sentences, self.vocab)
        self.base = len(self.vocab) + 1
        # Per order k: sorted table of corpus n-gram codes and their document frequency.
        # Codes are hierarchical: code_1 = word id, code_k = (index of the (k-1)-gram prefix in
        # table_{k-1} + 1) * base + word id (exactly ngram_levels' codes), so any query n-gram
        # can be looked up exactly.
        nref = np.fromiter(map(len, refs_corpus), dtype=np.int64, count=len(refs_corpus))
        rmax = max(int(nref.max()) if nref.shape[0] else 1, 1)
        img = np.repeat(np.arange(nref.shape[0], dtype=np.int64), nref)
        first = np.cumsum(nref) - nref
        cells = img * rmax + np.arange(img.shape[0], dtype=np.int64) - first[img]
        self.tables: list[np.ndarray] = []
        self.dfs: list[np.ndarray] = []
        for lv in ngram_levels(lengths, words, len(self.vocab), cells, rmax, 0, n):
            self.tables.append(lv.codes)
            self.dfs.append(lv.gram_doc_freq())

    def _df_fn(self, batch_base: int) -> Callable[[Level], np.ndarray]:
        """Document frequencies for the levels of one batch (called for k = 1..n in order).

        Only the batch's *distinct* n-grams are looked up: a batch code ``(prefix rank + 1) *
        batch_base + word`` is translated to the corpus code through the corpus index of its
        prefix, found at the previous order."""
        state: dict[str, np.ndarray] = {}

        def df_fn(lv: Level) -> np.ndarray:
            codes = lv.codes
            table = self.tables[lv.k - 1] if lv.k - 1 < len(self.tables) else np.zeros(0, int)
            if lv.k == 1:
                word, ok, ccode = codes, codes < self.base, codes
            else:
                prefix, word = np.divmod(codes, batch_base)
                cp = state["cmap"][prefix - 1]
                ok = (cp >= 0) & (word < self.base)
                ccode = (cp + 1) * self.base + word
            if table.shape[0] == 0:
                state["cmap"] = np.full(codes.shape[0], -1, dtype=np.int64)
                return np.zeros(lv.tf.shape[0], dtype=np.float64)
            idx = np.minimum(np.searchsorted(table, ccode), table.shape[0] - 1)
            found = ok & (table[idx] == ccode)
            state["cmap"] = np.where(found, idx, -1)
            return np.where(found, self.dfs[lv.k - 1][idx], 0.0)[lv.gram_seg]

        return df_fn

    def score(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        if len(hyps) != len(refs):
            raise ValueError("need one reference list per hypothesis")
        if not hyps:
            return np.zeros(0, dtype=np.float64)
        groups: dict[Any, int] = {}
        by_obj: dict[int, int] = {}
        uniq: list[list[str]] = []
        himg = np.empty(len(hyps), dtype=np.int64)
        for i, r in enumerate(refs):
            j = by_obj.get(id(r))
            if j is None:
                key = tuple(r)
                j = groups.get(key)
                if j is None:
                    j = groups[key] = len(uniq)
                    uniq.append(list(r))
                by_obj[id(r)] = j
            himg[i] = j
        # a private copy of the vocabulary: words unseen in the corpus get ids >= self.base
        p = prepare([as_hypothesis(h) for h in hyps], himg, uniq, Vocab(self.vocab.ids))
        return _cider_scores(p, self.n, self.sigma, self.log_n, self._df_fn(p.vocab_size + 1))
