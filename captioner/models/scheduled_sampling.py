"""Scheduled sampling (Bengio et al. 2015): teacher forcing where some input tokens are the
model's own predictions, so that training sees the kind of prefixes generation produces."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.models.attention import average_heads
from captioner.models.decoder import StepDecoder


def mix_tokens(gold: Tensor, predicted: Tensor, prob: float) -> Tensor:
    """Each gold input token (N,) replaced by the model's prediction with probability ``prob``."""
    replace = torch.rand(gold.shape, device=gold.device) < prob
    return torch.where(replace, predicted, gold)


def scheduled_sampling(
    decoder: StepDecoder, features: Tensor, tokens: Tensor, prob: float
) -> tuple[Tensor, Tensor]:
    """Teacher forcing over the step interface (any decoder), where every input after BOS is,
    with probability ``prob``, a token sampled from the model's previous output instead of the
    gold one. features (B, R, C), tokens (B*k, T) -> logits (B*k, T, V), attention (B*k, T, R),
    like ``decoder(features, tokens)`` (which it equals at ``prob`` 0)."""
    # the k captions of an image share its features
    state = decoder.expand_state(decoder.init_state(features), tokens.size(0) // features.size(0))
    logits, attns = [], []
    inputs = tokens[:, 0]  # (B*k,) BOS
    for t in range(tokens.size(1)):
        if t > 0:
            with torch.no_grad():  # the choice of input is not differentiated
                predicted = torch.multinomial(logits[-1].float().softmax(-1), 1).squeeze(1)
            inputs = mix_tokens(tokens[:, t], predicted, prob)
        step_logits, state, attn = decoder.step(inputs, state)  # (B*k, V)
        logits.append(step_logits)
        attns.append(average_heads(attn))  # (B*k, R)
    return torch.stack(logits, 1), torch.stack(attns, 1)
