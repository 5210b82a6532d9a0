"""Greedy, beam and sampling against a tiny deterministic decoder and brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from captioner.models.decoder import StepDecoder
from captioner.models.search import beam_search, generate, greedy_search, sample

PAD, BOS, EOS = 0, 1, 2
V, R, C = 6, 4, 3


class ToyDecoder(StepDecoder):
    """logits = table[last] + feature term + history term, where the history h is a decayed
    count of the tokens so far (so the best continuation depends on the whole prefix and beam
    search beats greedy). Channel 0 of the features is an extra EOS bias per image."""

    def __init__(self, seed: int = 0, eos_bias: float = 0.0, only_eos: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))

        self.vocab_size = V
        self.table, self.w_feat, self.w_hist = rand(V, V), rand(C, V), rand(V, V)
        self.w_hist.data *= 2
        self.w_query = rand(V, C)
        self.eos_bias, self.only_eos = eos_bias, only_eos
        self.batch_sizes = []  # rows per step call, to check that done images are dropped

    def init_state(self, features):
        return {"h": features.new_zeros(features.size(0), V), "feat": features}

    def step(self, tokens, state):
        self.batch_sizes.append(tokens.size(0))
        feat = state["feat"]  # (B, R, C)
        h = 0.5 * state["h"] + nn.functional.one_hot(tokens, V).to(feat.dtype)  # (B, V)
        attn = torch.softmax((feat @ (h @ self.w_query)[:, :, None]).squeeze(2), -1)  # (B, R)
        ctx = (attn[:, :, None] * feat).sum(1)  # (B, C)
        logits = self.table[tokens] + ctx @ self.w_feat + h @ self.w_hist  # (B, V)
        eos = torch.zeros_like(logits)
        eos[:, EOS] = self.eos_bias + 50.0 * feat[:, 0, 0]
        logits = logits + eos
        if self.only_eos:
            logits = torch.full_like(logits, float("-inf")).index_fill(1, torch.tensor([EOS]), 0.0)
        return logits, {"h": h, "feat": feat}, attn


def feats(B, seed=1):
    f = torch.randn(B, R, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f[:, 0, 0] = 0.0  # no per-image EOS bias unless a test sets one
    return f


def strip(seq):
    """Token list up to and including EOS (pads removed)."""
    out = []
    for t in seq.tolist():
        if t == PAD:
            break
        out.append(t)
        if t == EOS:
            break
    return out


def seq_logprob(dec, f, seq):
    """Summed log-prob of a caption (list, EOS included if present) for one image f (1, R, C)."""
    state, last, total = dec.init_state(f), torch.tensor([BOS]), 0.0
    for t in seq:
        logits, state, _ = dec.step(last, state)
        total += logits.log_softmax(-1)[0, t].item()
        last = torch.tensor([t])
    return total


def lp(n, alpha):
    return ((5 + n) / 6) ** alpha


def enumerate_all(dec, f, max_length, min_length, alpha):
    """Every caption the search can return, with its normalised score, best first."""
    words = [t for t in range(V) if t != EOS]
    out = []
    for n in range(max_length + 1):
        for w in itertools.product(words, repeat=n):
            seqs = [list(w) + [EOS]] if n < max_length and n >= min_length else []
            if n == max_length:
                seqs.append(list(w))  # cut at max_length without EOS
            for s in seqs:
                out.append((seq_logprob(dec, f, s) / lp(len(s), alpha), s))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_beam_matches_exhaustive_enumeration(alpha):
    dec, L = ToyDecoder(), 3
    f = feats(2)
    K = V**L  # every prefix survives: the search is exact
    tokens, _, scores = beam_search(
        dec, f, BOS, EOS, PAD, beam_size=K, max_length=L, min_length=1,
        length_penalty=alpha, num_return=5,
    )  # fmt: skip
    for i in range(2):
        ranked = enumerate_all(dec, f[i : i + 1], L, 1, alpha)
        for j in range(5):
            assert strip(tokens[i, j]) == ranked[j][1]
            assert scores[i, j].item() == pytest.approx(ranked[j][0], abs=1e-9)


def test_beam_differs_from_greedy_and_beats_it():
    dec = ToyDecoder()
    f = feats(16)
    g, _ = greedy_search(dec, f, BOS, EOS, PAD, max_length=6, min_length=1)
    b, _, s = beam_search(dec, f, BOS, EOS, PAD, beam_size=4, max_length=6)
    differ = 0
    for i in range(16):
        gs = seq_logprob(dec, f[i : i + 1], strip(g[i]))
        assert s[i].item() >= gs - 1e-9  # greedy's path is in the beam's search space
        assert s[i].item() == pytest.approx(seq_logprob(dec, f[i : i + 1], strip(b[i])))
        differ += strip(g[i]) != strip(b[i])
    assert differ > 0, "toy decoder too easy: beam never differs from greedy"


@pytest.mark.parametrize("min_length,ngram", [(0, 0), (1, 0), (3, 2)])
def test_beam_size_one_is_greedy(min_length, ngram):
    dec = ToyDecoder()
    f = feats(16)
    kw = {"max_length": 8, "min_length": min_length, "no_repeat_ngram_size": ngram}
    g, ga = greedy_search(dec, f, BOS, EOS, PAD, **kw)
    b, ba, _ = beam_search(dec, f, BOS, EOS, PAD, beam_size=1, **kw)
    assert torch.equal(b, g[:, : b.size(1)]) and (g[:, b.size(1) :] == PAD).all()
    real = b != PAD
    assert torch.allclose(ba[real], ga[:, : b.size(1)][real])
    gen, _ = generate(dec, f, BOS, EOS, PAD, method="beam", beam_size=1, length_penalty=0.7, **kw)
    assert torch.equal(gen, g)


def test_batched_equals_one_image_at_a_time():
    dec = ToyDecoder()
    f = feats(5)
    kw = {
        "beam_size": 3,
        "max_length": 7,
        "length_penalty": 0.7,
        "no_repeat_ngram_size": 2,
        "num_return": 3,
    }
    tokens, attn, scores = beam_search(dec, f, BOS, EOS, PAD, **kw)
    for i in range(5):
        t1, a1, s1 = beam_search(dec, f[i : i + 1], BOS, EOS, PAD, **kw)
        n = t1.size(2)
        assert torch.equal(tokens[i, :, :n], t1[0]) and (tokens[i, :, n:] == PAD).all()
        assert torch.allclose(scores[i], s1[0])
        assert torch.allclose(attn[i, :n], a1[0])


def test_done_images_leave_the_batch():
    dec = ToyDecoder()
    f = feats(4)
    f[0, 0, 0] = 1.0  # image 0: EOS is certain at the first step
    dec.batch_sizes.clear()
    tokens, _, _ = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, max_length=6, min_length=0)
    assert tokens[0].tolist()[0] == EOS
    # one row per image at the first step, then K beams for the 3 images still searched
    assert dec.batch_sizes[:2] == [4, 9]


def test_beam_larger_than_vocab_and_batch_of_one():
    dec = ToyDecoder()
    f = feats(1)
    tokens, attn, scores = beam_search(dec, f, BOS, EOS, PAD, beam_size=10, max_length=5)
    assert tokens.shape[0] == 1 and attn.shape[:2] == tokens.shape and attn.size(2) == R
    assert scores[0].item() == pytest.approx(seq_logprob(dec, f, strip(tokens[0])))
    # a larger beam can only find a better (or the same) best hypothesis here (exhaustive-ish)
    _, _, s3 = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, max_length=5)
    assert scores[0] >= s3[0] - 1e-9


def test_max_length_one():
    dec = ToyDecoder()
    f = feats(3)
    tokens, attn, scores = beam_search(dec, f, BOS, EOS, PAD, beam_size=4, max_length=1)
    assert tokens.shape == (3, 1) and attn.shape == (3, 1, R)
    for i in range(3):  # best single word (min_length=1 forbids EOS)
        best = max((seq_logprob(dec, f[i : i + 1], [w]), w) for w in range(V) if w != EOS)
        assert tokens[i, 0].item() == best[1] and scores[i].item() == pytest.approx(best[0])


def test_all_beams_end_at_first_step():
    f = feats(3)
    dec = ToyDecoder(only_eos=True)  # EOS is the only finite token
    tokens, attn, scores = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, min_length=0)
    assert tokens.tolist() == [[EOS]] * 3 and torch.allclose(scores, torch.zeros(3).double())
    assert attn.shape == (3, 1, R)
    # and with EOS also forbidden nothing can be returned, but nothing crashes either
    tokens, _, scores = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, min_length=1)
    assert (tokens == PAD).all() and torch.isinf(scores).all()
    tokens, _, scores = beam_search(ToyDecoder(eos_bias=30.0), f, BOS, EOS, PAD, min_length=0)
    assert tokens.tolist() == [[EOS]] * 3


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_min_length(method):
    dec = ToyDecoder(eos_bias=8.0)  # EOS would come first everywhere
    f = feats(6)
    kw = {"beam_size": 3, "max_length": 8, "min_length": 3}
    if method == "greedy":
        tokens = generate(dec, f, BOS, EOS, PAD, method="greedy", **kw)[0][:, None]
    else:
        tokens = beam_search(dec, f, BOS, EOS, PAD, num_return=3, **kw)[0]
    for i, seq in enumerate(tokens.flatten(0, 1)):
        s = strip(seq)
        assert s[-1] == EOS and len(s) >= 4 and EOS not in s[:-1]
        if i % tokens.size(1) == 0:
            assert len(s) == 4  # the best: exactly 3 words, then EOS right away


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_no_repeat_ngram(n, method):
    dec = ToyDecoder(seed=3, eos_bias=-6.0)  # long captions, lots of repetition otherwise
    f = feats(6)
    kw = {"max_length": 10, "min_length": 0, "no_repeat_ngram_size": n}
    if method == "greedy":
        tokens = greedy_search(dec, f, BOS, EOS, PAD, **kw)[0][:, None]
    else:
        tokens = beam_search(dec, f, BOS, EOS, PAD, beam_size=4, num_return=4, **kw)[0]
    free = greedy_search(dec, f, BOS, EOS, PAD, max_length=10, min_length=0)[0]
    repeats_without = 0
    for seq in free:
        s = [t for t in strip(seq) if t != EOS]
        grams = [tuple(s[j : j + 2]) for j in range(len(s) - 1)]
        repeats_without += len(grams) != len(set(grams))
    assert repeats_without > 0, "toy decoder does not repeat: the test would prove nothing"
    for seq in tokens.flatten(0, 1):
        s = [t for t in strip(seq) if t != EOS]
        grams = [tuple(s[j : j + n]) for j in range(len(s) - n + 1)]
        assert len(grams) == len(set(grams)), s


def test_generate_dispatch():
    dec = ToyDecoder()
    f = feats(4)
    g = greedy_search(dec, f, BOS, EOS, PAD, max_length=6, min_length=1)
    assert torch.equal(generate(dec, f, BOS, EOS, PAD, method="greedy", max_length=6)[0], g[0])
    tokens, attn = generate(dec, f, BOS, EOS, PAD, method="beam", beam_size=3, max_length=6)
    b = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, max_length=6)
    assert torch.equal(tokens, b[0]) and torch.equal(attn, b[1])
    with pytest.raises(ValueError):
        generate(dec, f, BOS, EOS, PAD, method="nucleus")


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_generate_returns_alternatives_with_their_scores(alpha):
    """``num_return``: the N best hypotheses (B, N, L), best first, each scored by its summed
    log-prob over lp(|Y|), the same for greedy (N = 1) as for beam."""
    dec, f = ToyDecoder(), feats(3)
    tokens, attn, scores = generate(dec, f, BOS, EOS, PAD, method="beam", beam_size=4,
                                    max_length=5, length_penalty=alpha, num_return=3)
    assert tokens.shape[:2] == (3, 3) and scores.shape == (3, 3)
    plain = generate(dec, f, BOS, EOS, PAD, method="beam", beam_size=4, max_length=5,
                     length_penalty=alpha)
    assert torch.equal(tokens[:, 0, : plain[0].size(1)], plain[0]) and torch.equal(attn, plain[1])
    for i in range(3):
        assert (scores[i, :-1] >= scores[i, 1:]).all()
        for n in range(3):
            seq = strip(tokens[i, n])
            want = seq_logprob(dec, f[i : i + 1], seq) / lp(len(seq), alpha)
            assert scores[i, n].item() == pytest.approx(want, abs=1e-9)
    g_tokens, g_attn, g_scores = generate(dec, f, BOS, EOS, PAD, method="greedy", max_length=5,
                                          length_penalty=alpha, num_return=1)
    g = greedy_search(dec, f, BOS, EOS, PAD, max_length=5, min_length=1)
    assert torch.equal(g_tokens[:, 0], g[0]) and torch.equal(g_attn, g[1])
    for i in range(3):
        seq = strip(g_tokens[i, 0])
        want = seq_logprob(dec, f[i : i + 1], seq) / lp(len(seq), alpha)
        assert g_scores[i, 0].item() == pytest.approx(want, abs=1e-9)


def test_sample_logprobs_and_mask():
    torch.manual_seed(0)
    dec = ToyDecoder(eos_bias=1.0)
    B, S, f = 3, 4, feats(3)
    tokens, logps, mask = sample(dec, f, BOS, EOS, PAD, num_samples=S, max_length=8)
    L = tokens.size(1)
    assert tokens.shape == logps.shape == mask.shape == (B * S, L)
    assert logps.requires_grad
    # recompute with teacher forcing on image-major repeated features
    state = dec.init_state(f.repeat_interleave(S, 0))
    last, ref = torch.full((B * S,), BOS), []
    for t in range(L):
        logits, state, _ = dec.step(last, state)
        ref.append(logits.log_softmax(-1).gather(1, tokens[:, t : t + 1]).squeeze(1))
        last = tokens[:, t]
    ref = torch.stack(ref, 1)
    assert torch.allclose(logps[mask], ref[mask])
    assert (logps[~mask] == 0).all()
    for row, m in zip(tokens, mask):
        s = strip(row)
        assert m.sum().item() == len(s)  # real positions = words + EOS
        assert (row[len(s) :] == PAD).all()
    assert (tokens == EOS).any() and (~mask).any(), "no sample ended early: weak test"
    (logps * mask).sum().backward()
    assert dec.table.grad is not None and dec.table.grad.abs().sum() > 0


# ---- bans: <unk> never chosen, no caption ends right after a bad-ending word --------------------
UNK, BAD = 3, 4  # in the toy vocabulary: token 3 plays <unk>, token 4 an article like "a"


class Favouring(ToyDecoder):
    """The toy decoder with <unk> strongly preferred and EOS most likely right after BAD."""

    def step(self, tokens, state):
        logits, state, attn = super().step(tokens, state)
        logits = logits.clone()
        logits[:, UNK] += 20.0
        logits[:, BAD] += 5.0
        logits[:, EOS] += torch.where(tokens == BAD, 30.0, -2.0).to(logits.dtype)
        return logits, state, attn


def _runs(dec, f, **bans):
    g, _ = greedy_search(dec, f, BOS, EOS, PAD, max_length=8, **bans)
    b, _, _ = beam_search(dec, f, BOS, EOS, PAD, beam_size=3, max_length=8, **bans)
    torch.manual_seed(0)
    s, _, _ = sample(dec, f, BOS, EOS, PAD, num_samples=4, max_length=8, **bans)
    return {"greedy": g, "beam": b, "sample": s}


def _ends_after_bad(seq):
    toks = strip(seq)
    return len(toks) >= 2 and toks[-1] == EOS and toks[-2] == BAD


def test_unk_is_never_chosen_when_banned():
    dec, f = Favouring(), feats(5)
    without = _runs(dec, f)
    assert all((t == UNK).any() for t in without.values())  # the toy really wants <unk>
    for name, tokens in _runs(dec, f, unk_id=UNK).items():
        assert not (tokens == UNK).any(), name


def test_no_caption_ends_right_after_a_bad_ending_word():
    dec, f = Favouring(), feats(5)
    without = _runs(dec, f, unk_id=UNK)
    assert all(any(_ends_after_bad(r) for r in t) for t in without.values())  # it wants to
    for name, tokens in _runs(dec, f, unk_id=UNK, bad_ending_ids=[BAD]).items():
        assert not any(_ends_after_bad(r) for r in tokens), name
        if name != "sample":  # (samples may draw the toy's PAD)
            assert all(strip(r)[-1] == EOS for r in tokens if len(strip(r)) < 8), name  # still ends


def test_beam_1_equals_greedy_with_bans():
    dec, f = Favouring(), feats(5)
    bans = {"unk_id": UNK, "bad_ending_ids": [BAD]}
    g, _ = greedy_search(dec, f, BOS, EOS, PAD, max_length=8, **bans)
    b, _ = generate(dec, f, BOS, EOS, PAD, method="beam", beam_size=1, max_length=8, **bans)
    assert torch.equal(g, b)
