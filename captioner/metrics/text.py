"""Text utilities shared by the caption metrics.

* :func:`tokenize` -- a pure-Python approximation of what pycocoevalcap's ``PTBTokenizer``
  produces (Stanford PTBTokenizer 3.4.1 with ``-preserveLines -lowerCase`` followed by the
  removal of the tokens in :data:`PUNCTUATIONS`).  Used when Java is absent and for fast
  in-loop validation.
* :func:`build_ngrams` -- vectorised (numpy) n-gram extraction for many sentences at once.
  It is the engine behind the fast BLEU and CIDEr-D implementations: n-grams are encoded as
  integers so that term frequencies, document frequencies and hypothesis/reference matching
  become sorts, ``searchsorted`` and ``bincount`` instead of per-sentence Python dicts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any

import numpy as np

# Exactly the list pycocoevalcap's PTBTokenizer removes.  Note that it contains the *upper-case*
# bracket escapes while the tokenizer runs with -lowerCase, so "-lrb-" etc. are never removed
# by pycocoevalcap; we keep that behaviour.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_LINE_BREAKS = re.compile(r"[\r\n\u000b\u000c\u0085\u2028\u2029]")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
             "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
# opening double quote: at start or after whitespace / opening bracket
_DQ_OPEN = re.compile(r'(^|(?<=[\s(\[{]))"')
_SQ_OPEN = re.compile(r"(^|(?<=[\s(\[{]))'(?=\w)")
_CONTRACTIONS = [
    (re.compile(r"(?i)\b(ca|wo|sha|do|does|did|is|are|was|were|has|have|had|could|would|should"
                r"|must|might|need|ai)(n't)\b"), r"\1 \2"),
    (re.compile(r"(?i)(\w)('s|'m|'re|'ll|'d|'ve)\b"), r"\1 \2"),
]
_ELLIPSIS = re.compile(r"\.\.\.+")
_DASHES = re.compile(r"--+")
# runs of sentence punctuation (PTB keeps runs like "!!!" or "?!" as one token)
_PUNCT_RUN = re.compile(r"[!?]+")
# , ; : not between digits
_SEP = re.compile(r"(?<!\d)[,;:]|[,;:](?!\d)")
_ABBREV = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "ca.",
                     "no.", "co.", "inc.", "ltd.", "mt.", "ft.", "e.g.", "i.e.", "prof."])
_CURRENCY = re.compile(r"([$\u00a3\u20ac])(?=\d)")
_PERCENT = re.compile(r"(?<=\d)%")


def _split_period(tok: str) -> list[str]:
    if len(tok) > 1 and tok.endswith(".") and tok not in _ABBREV and tok.strip("."):
        body = tok[:-1]
        # acronyms such as "u.s.a." keep their final period
        if "." in body and re.fullmatch(r"(?:[a-z]\.)+[a-z]", body):
            return [tok]
        return [body, "."]
    return [tok]


def ptb_tokenize(caption: str) -> list[str]:
    """Approximate Stanford PTBTokenizer (``-lowerCase``) output tokens, punctuation kept."""
    s = _LINE_BREAKS.sub(" ", caption)
    s = _DQ_OPEN.sub(" `` ", s)
    s = s.replace('"', " '' ").replace("''", " '' ").replace("``", " `` ")
    s = re.sub(r"(?<!`)`(?!`)", " ` ", s)
    s = s.replace(" 'n' ", " \x01n\x01 ")  # rock 'n' roll
    s = _SQ_OPEN.sub(" ` ", s)
    s = _BRACKET_RE.sub(lambda m: _BRACKETS[m.group(0)], s)
    s = _ELLIPSIS.sub(" ... ", s)
    s = _DASHES.sub(" -- ", s)
    s = _PUNCT_RUN.sub(lambda m: " " + m.group(0) + " ", s)
    s = _SEP.sub(lambda m: " " + m.group(0) + " ", s)
    s = _CURRENCY.sub(r"\1 ", s)
    s = _PERCENT.sub(" %", s)
    for pat, rep in _CONTRACTIONS:
        s = pat.sub(rep, s)
    out: list[str] = []
    for tok in s.lower().split():
        if tok == "\x01n\x01":
            out.append("'n'")
            continue
        if tok.endswith("'") and len(tok) > 1 and not tok.endswith("''") and tok != "ol'":
            # closing single quote / plural possessive: kids' -> kids '
            out.extend(_split_period(tok[:-1]))
            out.append("'")
            continue
        out.extend(_split_period(tok))
    return out


_SIMPLE = re.compile(r"[a-z0-9 ]*\.?[ ]*")


def as_hypothesis(h: Any) -> str:
    """One generated caption as the metrics take it: a string, or a one-element list holding
    one (pycocoevalcap's ``{image_id: [caption]}`` layout)."""
    if isinstance(h, str):
        return h
    if isinstance(h, (list, tuple)) and len(h) == 1 and isinstance(h[0], str):
        return h[0]
    raise TypeError(f"hypothesis must be a string (or a one-element list), got {h!r}")


@lru_cache(maxsize=1 << 18)
def tokenize(caption: str) -> str:
    """Lower-case, PTB-tokenize and strip punctuation like pycocoevalcap's ``PTBTokenizer``.

    Pure Python; agrees with the Java tokenizer on ordinary captions (punctuation at the ends of
    words, contractions, possessives, quotes, brackets).  Returns space-separated tokens.
    Results are cached (references are re-tokenized every validation epoch).
    """
    low = caption.lower()
    if _SIMPLE.fullmatch(low):  # fast path: words, digits, spaces and a final period
        toks = low.split()
        if not toks or toks[-1] not in _ABBREV:
            return " ".join(low.replace(".", " ").split())
    return " ".join(t for t in ptb_tokenize(caption) if t not in PUNCTUATIONS)


# ---------------------------------------------------------------------------------------------
# vectorised n-gram extraction
# ---------------------------------------------------------------------------------------------


class Vocab:
    """Word -> id (1-based) mapping that grows as new words are seen."""

    def __init__(self, ids: dict[str, int] | None = None) -> None:
        self.ids: dict[str, int] = dict(ids) if ids else {}

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, tokens: list[str]) -> np.ndarray:
        ids = self.ids
        missing = set(tokens).difference(ids)
        if missing:
            start = len(ids) + 1
            for i, w in enumerate(sorted(missing)):
                ids[w] = start + i
        return np.fromiter(map(ids.__getitem__, tokens), dtype=np.int64, count=len(tokens))


_SENTINEL = "\x00"


def split_sentences(sentences: Sequence[str], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Whitespace-split sentences -> (tokens per sentence, flat 1-based word ids)."""
    joined = "".join(sentences)
    if _SENTINEL in joined:  # cannot use the fast path
        toks = [s.split() for s in sentences]
        lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
        return lengths, vocab.encode(list(chain.from_iterable(toks)))
    # one big split is ~3x faster than one split per sentence; a sentinel token marks the ends
    flat = (" " + _SENTINEL + " ").join(sentences).split()
    ids = vocab.ids
    missing = set(flat).difference(ids)
    missing.discard(_SENTINEL)
    if missing:
        start = len(ids) + 1
        ids.update(zip(missing, range(start, start + len(missing))))
    ids[_SENTINEL] = 0
    try:
        arr = np.fromiter(map(ids.__getitem__, flat), dtype=np.int64, count=len(flat))
    finally:
        del ids[_SENTINEL]
    ends = np.flatnonzero(arr == 0)
    bounds = np.concatenate([[-1], ends, [arr.shape[0]]]) if len(sentences) else np.zeros(1)
    lengths = (np.diff(bounds) - 1).astype(np.int64)
    return lengths, arr[arr != 0]


def token_layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sentence index of each token, tokens remaining in the sentence from each token on)."""
    S = int(lengths.shape[0])
    T = int(lengths.sum()) if S else 0
    sent_of_tok = np.repeat(np.arange(S, dtype=np.int64), lengths)
    starts = np.zeros(S, dtype=np.int64)
    if S > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    remaining = lengths[sent_of_tok] - (np.arange(T, dtype=np.int64) - starts[sent_of_tok])
    return sent_of_tok, remaining


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    flag = np.empty(sorted_keys.shape[0], dtype=bool)
    if flag.shape[0]:
        flag[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=flag[1:])
    return flag


@dataclass
class Level:
    """The distinct (n-gram, image, slot) triples of one n-gram order ``k``.

    Entries are sorted by n-gram, then image, then slot (a sentence of an image); hypotheses use
    the low slots (``slot < n_hyp_slots``) so that, within an (n-gram, image) *group*, the
    hypothesis entries come before the reference entries.
    """

    k: int
    tf: np.ndarray  # term frequency of the n-gram in the sentence
    cell: np.ndarray  # img * n_slots + slot
    img: np.ndarray
    slot: np.ndarray
    is_ref: np.ndarray  # bool
    group: np.ndarray  # (n-gram, image) group index of each entry, non-decreasing
    group_start: np.ndarray  # index of the first entry of each group
    gram_seg: np.ndarray  # n-gram index of each entry (dense, non-decreasing)
    n_grams: int
    codes: np.ndarray  # sorted distinct n-gram codes (index = gram_seg)

    def ref_doc_freq(self) -> np.ndarray:
        """Per entry: number of images whose references contain the entry's n-gram."""
        if self.tf.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        prev_same = np.zeros(self.tf.shape[0], dtype=bool)
        prev_same[1:] = (self.group[1:] == self.group[:-1]) & self.is_ref[:-1]
        first_ref = self.is_ref & ~prev_same  # first reference entry of its group
        df = np.bincount(self.gram_seg, weights=first_ref, minlength=self.n_grams)
        return df[self.gram_seg]

    def gram_doc_freq(self) -> np.ndarray:
        """Per distinct n-gram (``codes`` order): number of images whose references have it."""
        if self.tf.shape[0] == 0:
            return np.zeros(self.n_grams, dtype=np.float64)
        first = self.is_ref.copy()
        first[1:] &= ~((self.group[1:] == self.group[:-1]) & self.is_ref[:-1])
        return np.bincount(self.gram_seg, weights=first, minlength=self.n_grams)


def ngram_levels(lengths: np.ndarray, words: np.ndarray, vocab_size: int,
                 cell_of_sent: np.ndarray, n_slots: int, n_hyp_slots: int,
                 n: int) -> Iterator[Level]:
    """Yield a :class:`Level` for k = 1..n.

    ``cell_of_sent`` (= image * n_slots + slot) must be non-decreasing: the sentences are laid
    out image by image, so a token position order is also a cell order.  One sort per order
    of ``code * (T + 1) + position``; n-gram codes are exact and hierarchical: ``code_k = (rank
    of the (k-1)-gram prefix + 1) * (V + 1) + word``, where the rank comes from the previous
    order's sort, so codes stay below ``(T + 2) * (V + 1)`` (a lexsort fallback handles the
    astronomically large batches where the packed key would overflow int64).
    """
    T = int(words.shape[0])
    base = vocab_size + 1
    n_slots = max(n_slots, 1)
    sent_of_tok, remaining = token_layout(lengths)
    tok_cell = cell_of_sent[sent_of_tok]
    T1 = T + 1
    fits = (T + 2) * base * T1 < 2**62
    rank = np.zeros(T, dtype=np.int64)
    for k in range(1, n + 1):
        m = max(T - k + 1, 0)
        valid = np.flatnonzero(remaining[:m] >= k)
        if k == 1:
            code = words[valid]
        else:
            code = (rank[valid] + 1) * base + words[valid + (k - 1)]
        if fits:
            ks = np.sort(code * T1 + valid)
            code_s, pos_s = np.divmod(ks, T1)
        else:  # pragma: no cover
            order = np.lexsort((valid, code))
            code_s, pos_s = code[order], valid[order]
        cell_s = tok_cell[pos_s]
        new_gram = _run_starts(code_s)
        gram_rank = np.cumsum(new_gram) - 1
        if k < n:
            rank = np.zeros(T, dtype=np.int64)
            rank[pos_s] = gram_rank
        entry_flag = new_gram | _run_starts(cell_s)
        idx = np.flatnonzero(entry_flag)
        tf = np.diff(np.append(idx, code_s.shape[0]))
        e_cell = cell_s[idx]
        e_img, e_slot = np.divmod(e_cell, n_slots)
        gflag = new_gram[idx] | _run_starts(e_img)
        yield Level(k=k, tf=tf, cell=e_cell, img=e_img, slot=e_slot,
                    is_ref=e_slot >= n_hyp_slots, group=np.cumsum(gflag) - 1,
                    group_start=np.flatnonzero(gflag), gram_seg=gram_rank[idx],
                    n_grams=int(gram_rank[-1]) + 1 if gram_rank.shape[0] else 0,
                    codes=code_s[new_gram])
