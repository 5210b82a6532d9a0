"""Attention modules with one call signature.

Every module maps ``(query, keys, values, mask)`` to ``(context, weights)``:

- ``query``: ``(B, Dq)`` for one decoding step or ``(B, T, Dq)`` for T queries at once.
- ``keys``: ``(B, R, Dk)`` image regions (or any memory); ``values`` defaults to ``keys``.
- ``mask``: optional bool ``(B, R)`` (or ``(B, T, R)``), True where a position may be attended.
- ``context``: ``(B, Dv)`` or ``(B, T, Dv)``; ``weights``: ``(B, R)`` or ``(B, T, R)``
  (multi-head modules return ``(B, H, R)`` / ``(B, H, T, R)``).

Key-side projections do not depend on the query, so ``prepare(keys)`` computes them once per
image batch; decoders keep the result in their state and pass it back as ``prepared=`` at every
step instead of re-projecting the grid T times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax that gives exactly zero weight to masked positions (and all-zero rows when a row
    is fully masked, instead of NaN)."""
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=dim)
    return weights.nan_to_num(0.0)


class Attention(nn.Module):
    """Base class: subclasses implement ``score`` and optionally ``prepare``."""

    def prepare(self, keys: Tensor) -> Tensor:
        """Query-independent key projection; identity unless a subclass projects keys."""
        return keys

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        """(B, [T,] Dq), (B, R, D) -> unnormalised scores (B, [T,] R)."""
        raise NotImplementedError

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        mask: Tensor | None = None,
        prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        values = keys if values is None else values
        prepared = self.prepare(keys) if prepared is None else prepared
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, T, Dq)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(1)  # (B, 1, R)
        weights = masked_softmax(self.score(q, prepared), mask)  # (B, T, R)
        context = weights @ values  # (B, T, Dv)
        if single:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


class AdditiveAttention(Attention):
    """Bahdanau attention: score(q, k) = v^T tanh(W_q q + W_k k)."""

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attention_dim)
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)

    def prepare(self, keys: Tensor) -> Tensor:
        return self.key_proj(keys)  # (B, R, A)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = self.query_proj(query)  # (B, T, A)
        hidden = torch.tanh(q.unsqueeze(2) + prepared.unsqueeze(1))  # (B, T, R, A)
        return self.v(hidden).squeeze(-1)  # (B, T, R)


ATTENTIONS = {"additive": AdditiveAttention}


def build_attention(
    name: str, query_dim: int, key_dim: int, attention_dim: int, num_heads: int = 1
) -> Attention:
    """Attention module by config name (``model.decoder.attention``)."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose one of {sorted(ATTENTIONS)}")
    cls = ATTENTIONS[name]
    if name == "additive":
        return cls(query_dim, key_dim, attention_dim)
    raise AssertionError(name)
