"""Self-critical sequence training (Rennie et al. 2017): REINFORCE on sampled captions with the
CIDEr-D reward (optionally plus a weighted BLEU-4, whose brevity penalty pays for length, as
ruotianluo's ``bleu_reward_weight``), minus a baseline that needs no learned critic.

    loss = -(reward - baseline) * (sum of the caption's token log-probs) / caption length

A sample that beats the baseline is made more likely, one that falls short less likely. The
baseline is either the reward of the greedy caption of the same image (the paper's test-time
inference) or the mean reward of the image's *other* samples (leave-one-out, so a sample's
baseline does not depend on itself and the gradient stays unbiased).

Plain PyTorch and numpy: no Lightning here; ``training/module.py`` calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from captioner.metrics.bleu import sentence_bleu
from captioner.metrics.cider import CiderD
from captioner.metrics.text import tokenize

BASELINES = ("greedy", "mean")


def leave_one_out_baseline(rewards: Tensor) -> Tensor:
    """rewards (B, S) of S samples per image -> (B, S): for each sample, the mean reward of the
    other S-1 samples of its image."""
    S = rewards.size(1)
    if S < 2:
        raise ValueError("the 'mean' baseline needs at least 2 samples per image")
    return (rewards.sum(1, keepdim=True) - rewards) / (S - 1)


def self_critical_loss(logprobs: Tensor, mask: Tensor, reward: Tensor, baseline: Tensor) -> Tensor:
    """logprobs (N, L) of the sampled tokens (with grad), mask (N, L) real positions (EOS
    included), reward and baseline (N,). Returns the mean over the N samples of
    ``-(reward - baseline) * sum(logprobs) / length``."""
    advantage = (reward - baseline).detach().to(logprobs.dtype)  # (N,) a constant weight
    lengths = mask.sum(1).clamp(min=1).to(logprobs.dtype)  # (N,)
    mean_logprob = (logprobs * mask).sum(1) / lengths  # (N,)
    return -(advantage * mean_logprob).mean()


class CaptionReward:
    """CIDEr-D of captions against their image's references, with document frequencies from the
    training references (computed once; see ``metrics.cider.CiderD``), plus ``bleu_weight`` times
    the caption's BLEU-4 (0: CIDEr-D alone, the paper's reward). CIDEr-D's own length penalty
    is symmetric; BLEU's brevity penalty only punishes captions shorter than their references.

    refs: image id -> raw reference captions (tokenised here as the evaluation tokenises them).
    """

    def __init__(self, refs: Mapping[int, Sequence[str]], bleu_weight: float = 0.0):
        if bleu_weight < 0:
            raise ValueError(f"loss.scst.bleu_weight={bleu_weight}: must be >= 0")
        self.refs = {i: [tokenize(c) for c in caps] for i, caps in refs.items()}
        self.scorer = CiderD(self.refs)
        self.bleu_weight = float(bleu_weight)

    def __call__(self, captions: Sequence[str], image_ids: Sequence[int]) -> np.ndarray:
        """One reward per caption; ``image_ids[j]`` is the image of ``captions[j]``."""
        hyps = [tokenize(c) for c in captions]
        refs = [self.refs[i] for i in image_ids]
        reward = self.scorer.score(hyps, refs)
        if self.bleu_weight:
            reward = reward + self.bleu_weight * sentence_bleu(hyps, refs, 4)[:, 3]
        return reward


def rewards_and_baseline(
    reward_fn: CaptionReward, samples: Sequence[str], image_ids: Sequence[int], num_samples: int,
    baseline: str, greedy: Sequence[str] | None = None, device=None,
) -> tuple[Tensor, Tensor]:
    """Rewards of the ``B*S`` image-major samples and their baselines, both ``(B*S,)`` float32.
    ``greedy``: the B greedy captions, needed by the 'greedy' baseline."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown self-critical baseline {baseline!r} (one of {BASELINES})")
    S = num_samples
    ids = [i for i in image_ids for _ in range(S)]
    if baseline == "greedy":  # one scorer call for samples and greedy captions
        scores = reward_fn([*samples, *greedy], [*ids, *image_ids])
        reward = torch.as_tensor(scores[: len(ids)], dtype=torch.float32, device=device)
        base = torch.as_tensor(scores[len(ids):], dtype=torch.float32, device=device)
        return reward, base.repeat_interleave(S)
    reward = torch.as_tensor(reward_fn(samples, ids), dtype=torch.float32, device=device)
    return reward, leave_one_out_baseline(reward.view(-1, S)).view(-1)
