"""Caption generation over the step interface (see ``decoder.py``): greedy, beam, sampling.

Every function speaks only ``init_state`` / ``step`` / ``reorder_state``, so one implementation
serves the LSTM and the Transformer decoders alike. Conventions shared by all of them:

- returned tokens exclude BOS, keep EOS and are padded with ``pad_id`` after it;
- a caption that reaches ``max_length`` tokens without EOS is cut there (no EOS appended);
- ``min_length`` is the least number of tokens before EOS (EOS is banned at steps t < min_length);
- ``no_repeat_ngram_size`` n: no n-gram occurs twice within one caption;
- ``unk_id``: never chosen (greedy, beam and sampling alike), so a caption has no hole where a
  rare word was (the word-level tokenizer maps rare words to ``<unk>``, which decoding drops);
- ``bad_ending_ids``: words a caption must not end with (articles, prepositions): EOS is banned
  right after them, so "a boy is holding a" cannot be the answer;
- attention is returned per generated token, ``(B, L, R)``, heads averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.models.attention import average_heads
from captioner.models.decoder import StepDecoder


def _log_probs(logits: Tensor) -> Tensor:
    # half-precision logits (autocast) are summed over many steps: do it in float32
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.log_softmax(-1)


def vocabulary_bans(unk_id: int | None, bad_ending_ids: Sequence[int], ban_unk: bool = True,
                    ban_bad_endings: bool = True) -> dict:
    """The searches' ``unk_id`` / ``bad_ending_ids`` arguments for a model's vocabulary, each ban
    on or off (what ``Captioner`` and the ONNX runtime pass alike)."""
    return {"unk_id": unk_id if ban_unk else None,
            "bad_ending_ids": list(bad_ending_ids) if ban_bad_endings else ()}


@dataclass
class Constraints:
    """What the search may not choose: see the module docstring."""

    eos_id: int
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    unk_id: int | None = None
    bad_ending_ids: Sequence[int] = ()

    def _bad_mask(self, V: int, device) -> Tensor:
        """(V,) True at the bad-ending words: built once per search, not once per step."""
        mask = getattr(self, "_bad", None)
        if mask is None or mask.size(0) != V or mask.device != device:
            mask = torch.zeros(V, dtype=torch.bool, device=device)
            mask[list(self.bad_ending_ids)] = True
            self._bad = mask
        return mask

    def active(self, t: int) -> bool:
        return (t < self.min_length or self.no_repeat_ngram_size > 0 or self.unk_id is not None
                or len(self.bad_ending_ids) > 0)

    def ban(self, logp: Tensor, hist: Tensor, t: int) -> Tensor:
        """Set to -inf what is forbidden at step t. logp (M, V) log-probs or logits; hist (M, t)
        the tokens generated so far by each row. One ``masked_fill`` with a mask built without
        gradients, so sampling for self-critical training backprops through it cheaply."""
        if not self.active(t):
            return logp
        M, V = logp.shape
        banned = torch.zeros(M, V, dtype=torch.bool, device=logp.device)
        if t < self.min_length:
            banned[:, self.eos_id] = True
        if self.unk_id is not None:
            banned[:, self.unk_id] = True
        if len(self.bad_ending_ids) and t > 0:
            banned[:, self.eos_id] |= self._bad_mask(V, logp.device)[hist[:, -1]]
        n = self.no_repeat_ngram_size
        if n > 0 and t >= n:
            # a token is banned if the last n-1 tokens followed by it already occur earlier
            if n == 1:
                follow, match = hist, torch.ones_like(hist, dtype=torch.bool)  # (M, t)
            else:
                windows = hist.unfold(1, n - 1, 1)  # (M, t-n+2, n-1)
                match = (windows[:, :-1] == windows[:, -1:]).all(-1)  # (M, t-n+1)
                follow = hist[:, n - 1 :]  # (M, t-n+1) token after each window
            hits = torch.zeros(M, V, device=logp.device).scatter_add_(1, follow, match.float())
            banned |= hits > 0
        return logp.masked_fill(banned, float("-inf"))


@torch.no_grad()
def greedy_search(
    decoder: StepDecoder,
    features: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
    min_length: int = 0,
    no_repeat_ngram_size: int = 0,
    unk_id: int | None = None,
    bad_ending_ids: Sequence[int] = (),
    return_scores: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Most likely (allowed) token at every step, for a whole batch at once.

    Returns ``tokens (B, L)`` without BOS (EOS kept, padded with ``pad_id`` after it) and the
    attention of each generated token ``(B, L, R)`` (heads averaged for multi-head decoders).
    Finished rows stop changing; the loop ends when every row has emitted EOS. With
    ``return_scores`` also the summed log-prob of each caption ``(B,)`` (EOS included), the raw
    score beam search ranks by (a log-softmax per step more, so only on request).
    """
    B = features.size(0)
    rules = Constraints(eos_id, min_length, no_repeat_ngram_size, unk_id, bad_ending_ids)
    state = decoder.init_state(features)
    last = torch.full((B,), bos_id, dtype=torch.long, device=features.device)
    finished = torch.zeros(B, dtype=torch.bool, device=features.device)
    score = None  # (B,), in the dtype of the log-probs (float32 at least)
    tokens, attns = [], []
    for t in range(max_length):
        logits, state, attn = decoder.step(last, state)  # (B, V)
        if rules.active(t) or return_scores:  # the argmax of the logits is that of the log-probs
            if rules.no_repeat_ngram_size > 0:  # the whole caption so far: (B, t)
                hist = torch.stack(tokens, 1) if tokens else last.new_empty(B, 0)
            else:  # the other bans read only the last token: no O(t) stack per step
                hist = last[:, None] if tokens else last.new_empty(B, 0)  # (B, <=1)
            if return_scores:  # scores sum log-probs, as beam search does
                logits = _log_probs(logits)
            logits = rules.ban(logits, hist, t)
        nxt = logits.argmax(-1)
        if return_scores:  # logits are log-probs here
            step_logp = logits.gather(1, nxt[:, None]).squeeze(1).masked_fill(finished, 0.0)
            score = step_logp if score is None else score + step_logp
        nxt = nxt.masked_fill(finished, pad_id)
        tokens.append(nxt)
        attns.append(average_heads(attn))  # (B, R)
        finished |= nxt == eos_id
        last = nxt
        if finished.all():
            break
    if return_scores:
        if score is None:  # max_length 0
            score = features.new_zeros(B, dtype=torch.float32)
        return torch.stack(tokens, 1), torch.stack(attns, 1), score
    return torch.stack(tokens, 1), torch.stack(attns, 1)


def _length_penalty(length: Tensor | int, alpha: float) -> Tensor | float:
    """GNMT: lp(Y) = ((5 + |Y|) / 6) ** alpha, |Y| counting EOS."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    decoder: StepDecoder,
    features: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    beam_size: int = 3,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    num_return: int = 1,
    unk_id: int | None = None,
    bad_ending_ids: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Beam search over the whole batch at once: B images x K beams live in B*K rows of the
    decoder state, advanced by one ``step`` call per time step, with one top-k over K*V per image.

    A hypothesis is ranked by its summed log-prob divided by lp(|Y|) (``length_penalty`` = alpha;
    0 ranks by raw log-prob). A beam that emits EOS (among the top K candidates) moves to its
    image's finished pool (best K kept) and is replaced by the next best continuation, so K beams
    stay alive. An image is done when the ``num_return``-th best finished score can no longer be
    beaten by any alive beam (log-probs only decrease, so the bound is its score normalised at the
    most favourable reachable length); done images are dropped from the state, so they stop
    costing compute. Alive beams reaching ``max_length`` are finalised without EOS.

    Returns tokens ``(B, L)`` (or ``(B, num_return, L)``), the attention of the best hypothesis
    ``(B, L, R)`` (zeros after its end) and the scores ``(B,)`` (or ``(B, num_return)``), best
    first. Missing hypotheses (only possible with tiny vocabularies) are all-pad with score -inf.
    """
    assert 1 <= num_return <= beam_size, "num_return must be in [1, beam_size]"
    B, K, dev = features.size(0), beam_size, features.device
    neg_inf = float("-inf")
    L = max_length
    rules = Constraints(eos_id, min_length, no_repeat_ngram_size, unk_id, bad_ending_ids)

    # finished pool per image: best K normalised scores, their tokens, lengths and attention
    pool_score = None  # (B, K), in the dtype of the log-probs
    pool_tok = torch.full((B, K, L), pad_id, dtype=torch.long, device=dev)
    pool_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    pool_attn = None  # (B, K, L, R), allocated once R is known

    # alive beams of the N images still searched; img maps them to the batch
    img = torch.arange(B, device=dev)  # (N,)
    # the K beams of an image would start identical: the first step runs one row per image and
    # its top-k expands the state to K rows (k beams per image: 1, then K)
    state, k = decoder.init_state(features), 1
    score = features.new_zeros(B, 1)  # (N, k) summed log-probs
    last = torch.full((B,), bos_id, dtype=torch.long, device=dev)
    hist = last.new_empty(B, 0)  # (N*k, t) tokens generated so far
    ahist = None  # (N*K, t, R) their attention

    def add_to_pool(ids, cand_score, cand_tok, cand_attn, cand_len):
        """Merge candidates (N, C) into the pools of images ``ids`` (N,), keeping the best K."""
        n, c, t = cand_tok.shape
        pad_tok = torch.full((n, c, L - t), pad_id, dtype=torch.long, device=dev)
        cand_tok = torch.cat([cand_tok, pad_tok], 2)  # (N, C, L)
        cand_attn = F.pad(cand_attn, (0, 0, 0, L - t))  # (N, C, L, R)
        all_score = torch.cat([pool_score[ids], cand_score], 1)  # (N, K+C)
        best_score, best = all_score.topk(K, dim=1)  # (N, K), sorted
        arange = torch.arange(n, device=dev)[:, None]

        def pick(old, new):  # (B, K, ...), (N, C, ...) -> (N, K, ...) at the best positions
            return torch.cat([old[ids], new], 1)[arange, best]

        pool_tok[ids] = pick(pool_tok, cand_tok)
        pool_len[ids] = pick(pool_len, cand_len)
        pool_attn[ids] = pick(pool_attn, cand_attn)
        pool_score[ids] = best_score

    # state entries that depend only on the image (``static_state_keys``) stay at one row per
    # image: the decoder reads them for all K beams of the image (K-fold less memory traffic)
    static = set(decoder.static_state_keys) & set(state)

    for t in range(max_length):
        N = img.numel()
        logits, state, attn = decoder.step(last, state)  # (N*K, V)
        attn = average_heads(attn)  # (N*K, R)
        V = logits.size(-1)
        logp = rules.ban(_log_probs(logits), hist, t)
        if t == 0:  # shapes and dtypes are known now
            R = attn.size(-1)
            pool_attn = attn.new_zeros(B, K, L, R)
            ahist = attn.new_empty(B, 0, R)
            pool_score = logp.new_full((B, K), neg_inf)
            score = score.to(logp.dtype)
        cand = (score.view(-1, 1) + logp).view(N, k * V)  # (N, k*V)
        if k * V < K:  # first step with beam > vocab: pad so K beams (some dead) come out
            cand = F.pad(cand, (0, K - k * V), value=neg_inf)
        top_score, top_idx = cand.topk(min(2 * K, cand.size(1)), dim=1)  # (N, 2K), sorted
        top_beam, top_tok = (top_idx // V).clamp(max=k - 1), top_idx % V  # padding: any row
        top_row = top_beam + torch.arange(N, device=dev)[:, None] * k  # (N, 2K) rows of N*k
        is_eos = top_tok == eos_id

        # EOS among the first K candidates: finished (the others would not even be a top-K beam)
        fin = is_eos[:, :K] & top_score[:, :K].isfinite()  # (N, K)
        if fin.any():
            rows = top_row[:, :K]
            f_tok = torch.cat([hist[rows], top_tok[:, :K, None]], 2)  # (N, K, t+1)
            f_attn = torch.cat([ahist[rows], attn[rows][:, :, None]], 2)  # (N, K, t+1, R)
            f_score = top_score[:, :K] / _length_penalty(t + 1, length_penalty)
            f_score = f_score.masked_fill(~fin, neg_inf)
            f_len = torch.full_like(rows, t + 1)
            add_to_pool(img, f_score, f_tok, f_attn, f_len)

        # the best K non-EOS candidates continue (stable sort keeps the score order)
        order = is_eos.to(torch.uint8).sort(dim=1, stable=True).indices[:, :K]  # (N, K)
        a_score = top_score.gather(1, order)
        a_score = a_score.masked_fill(is_eos.gather(1, order), neg_inf)  # too few non-EOS
        a_row = top_row.gather(1, order).view(-1)  # (N*K,)
        a_tok = top_tok.gather(1, order).view(-1)
        hist = torch.cat([hist[a_row], a_tok[:, None]], 1)  # (N*K, t+1)
        ahist = torch.cat([ahist[a_row], attn[a_row][:, None]], 1)  # (N*K, t+1, R)
        score, last, k = a_score, a_tok, K

        if t == max_length - 1:  # cut: alive beams are finalised without EOS
            a_len = torch.full_like(score, t + 1, dtype=torch.long)
            norm = score / _length_penalty(t + 1, length_penalty)
            add_to_pool(img, norm, hist.view(N, K, -1), ahist.view(N, K, *ahist.shape[1:]), a_len)
            break

        # best normalised score any alive beam can still reach (score <= 0 only decreases, lp is
        # monotone in |Y|, so the best is at one of the two ends of the reachable lengths)
        bound = torch.maximum(
            score / _length_penalty(t + 2, length_penalty),
            score / _length_penalty(max_length, length_penalty),
        ).amax(1)  # (N,)
        done = pool_score[img, num_return - 1] >= bound  # -inf >= -inf: nothing left alive
        if done.all():
            break
        fixed = {key: v for key, v in state.items() if key in static}  # (N, ...) per image
        moving = {key: v for key, v in state.items() if key not in static}  # (N*k, ...)
        if done.any():  # drop finished images from the batch
            keep = (~done).nonzero().squeeze(1)  # (N',)
            keep_rows = (keep[:, None] * K + torch.arange(K, device=dev)).view(-1)  # (N'*K,)
            img, score = img[keep], score[keep]
            a_row, hist, ahist = a_row[keep_rows], hist[keep_rows], ahist[keep_rows]
            last = last[keep_rows]
            if fixed:
                fixed = decoder.reorder_state(fixed, keep)
        # one gather: beam reorder (first step: 1 row -> K per image) and image drop
        state = {**fixed, **decoder.reorder_state(moving, a_row)}

    # trim to the longest returned hypothesis
    T = max(int(pool_len[:, :num_return].max()), 1)
    if pool_attn is None:  # max_length 0
        return pool_tok[:, 0, :0], features.new_zeros(B, 0, 0), features.new_full((B,), neg_inf)
    tokens, scores = pool_tok[:, :num_return, :T], pool_score[:, :num_return]
    best_attn = pool_attn[:, 0, :T]
    if num_return == 1:
        tokens, scores = tokens[:, 0], scores[:, 0]
    return tokens, best_attn, scores


def generate(
    decoder: StepDecoder,
    features: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    method: str = "greedy",
    beam_size: int = 3,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    unk_id: int | None = None,
    bad_ending_ids: Sequence[int] = (),
    num_return: int | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """One entry point for inference: ``tokens (B, L)``, ``attn (B, L, R)``. Beam size 1 is
    greedy search (the length penalty cannot change a single greedy path).

    With ``num_return`` (an int) it also returns the scores and keeps the hypotheses: tokens
    ``(B, N, L)``, attention of the best ``(B, L, R)``, scores ``(B, N)``, best first (a server
    shows beam alternatives with their scores). Greedy search has one hypothesis (N = 1), scored by
    its summed log-prob over lp(|Y|) like a finished beam."""
    if method not in ("greedy", "beam"):
        raise ValueError(f"unknown decoding method {method!r}")
    if method == "greedy" or beam_size == 1:
        out = greedy_search(
            decoder, features, bos_id, eos_id, pad_id, max_length=max_length,
            min_length=min_length, no_repeat_ngram_size=no_repeat_ngram_size, unk_id=unk_id,
            bad_ending_ids=bad_ending_ids, return_scores=num_return is not None,
        )  # fmt: skip
        if num_return is None:
            return out
        tokens, attn, score = out
        length = (tokens != pad_id).sum(1)  # EOS counted, as beam search counts it
        score = score / _length_penalty(length.to(score.dtype), length_penalty)
        return tokens[:, None], attn, score[:, None]
    tokens, attn, scores = beam_search(
        decoder, features, bos_id, eos_id, pad_id, beam_size=beam_size, max_length=max_length,
        min_length=min_length, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, unk_id=unk_id, bad_ending_ids=bad_ending_ids,
        num_return=num_return or 1,
    )  # fmt: skip
    if num_return is None:
        return tokens, attn
    if num_return == 1:  # beam search drops the hypothesis dimension for a single one
        tokens, scores = tokens[:, None], scores[:, None]
    return tokens, attn, scores


def sample(
    decoder: StepDecoder,
    features: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    num_samples: int = 5,
    max_length: int = 20,
    temperature: float = 1.0,
    unk_id: int | None = None,
    bad_ending_ids: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``num_samples`` captions per image for self-critical training (gradients flow).
    ``unk_id`` and ``bad_ending_ids`` are banned as in the searches: samples are drawn from (and
    their log-probs taken under) the distribution renormalised over the allowed tokens.

    Rows are image-major: rows i*S .. i*S+S-1 belong to image i. Returns tokens ``(B*S, L)``
    (pad after EOS), the log-probs of the sampled tokens ``(B*S, L)`` under the distribution they
    were drawn from (logits / temperature), 0 at pads, and the mask ``(B*S, L)`` of real positions
    (EOS included).
    """
    B, S = features.size(0), num_samples
    rules = Constraints(eos_id, unk_id=unk_id, bad_ending_ids=bad_ending_ids)
    # one projection of the features per image, shared by its samples
    state = decoder.expand_state(decoder.init_state(features), S)
    last = torch.full((B * S,), bos_id, dtype=torch.long, device=features.device)
    finished = torch.zeros(B * S, dtype=torch.bool, device=features.device)
    tokens, logps, masks = [], [], []
    for t in range(max_length):
        logits, state, _ = decoder.step(last, state)  # (B*S, V)
        hist = last[:, None] if t else last.new_empty(B * S, 0)  # (B*S, <=1): only the last matters
        logp = _log_probs(rules.ban(logits, hist, t) / temperature)  # (B*S, V)
        with torch.no_grad():
            nxt = torch.multinomial(logp.exp(), 1).squeeze(1)  # (B*S,)
        real = ~finished
        nxt = nxt.masked_fill(finished, pad_id)
        tok_logp = logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(finished, 0.0)
        tokens.append(nxt)
        logps.append(tok_logp)
        masks.append(real)
        finished = finished | (nxt == eos_id)
        last = nxt
        if finished.all():
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1)
