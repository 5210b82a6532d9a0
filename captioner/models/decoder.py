"""The step interface every decoder speaks, so one search serves them all.

    state = decoder.init_state(features)              # features: (B, R, C), R image regions
    logits, state, attn = decoder.step(tokens, state)  # tokens: (B,) last token; logits: (B, V)
    state = decoder.reorder_state(state, index)        # beams: pick (and repeat) rows of the batch
    state = decoder.expand_state(state, k)             # k rows per image (captions, samples)

``state`` is a dict of tensors (or tuples of tensors) whose first dimension is the batch, so reordering is generic.
Entries named in ``static_state_keys`` depend only on the image (e.g. the features and their attention
keys): searches keep them at one row per image while the other entries hold G rows per image
(beams or samples, image-major), and ``step`` must accept that (G = rows / images).
Teacher-forced training uses ``decoder(features, tokens) -> (logits (B, T, V), attn)``; tests check
that it equals running ``step`` token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StepDecoder(nn.Module):
    vocab_size: int
    static_state_keys: tuple[str, ...] = ()  # see the module docstring
    # weight of the doubly stochastic attention penalty when the config leaves loss.alpha_c
    # null: it belongs to Show, Attend and Tell's decoder, not to every decoder
    default_alpha_c: float = 0.0

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict, Tensor]:
        raise NotImplementedError

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return {k: _select(v, index) for k, v in state.items()}

    def expand_state(self, state: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """The state of B images for B*k rows, image-major (rows i*k .. i*k+k-1 are image i's k
        captions or samples). ``static_state_keys`` entries stay at one row per image."""
        moving = {key: v for key, v in state.items() if key not in self.static_state_keys}
        if k == 1 or not moving:
            return state
        first = next(iter(moving.values()))
        first = first[0] if isinstance(first, tuple) else first  # (B, ...)
        index = torch.arange(first.size(0), device=first.device).repeat_interleave(k)  # (B*k,)
        return {**state, **self.reorder_state(moving, index)}


def _select(value, index: Tensor):
    # States may hold tuples (e.g. projected keys and values of multi-head attention).
    if isinstance(value, tuple):
        return tuple(_select(v, index) for v in value)
    return value.index_select(0, index)
