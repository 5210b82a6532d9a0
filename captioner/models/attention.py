"""Attention modules with one call signature.

Every module maps ``(query, keys, values, mask)`` to ``(context, weights)``:

- ``query``: ``(B, Dq)`` for one decoding step or ``(B, T, Dq)`` for T queries at once.
- ``keys``: ``(B, R, Dk)`` image regions (or any memory); ``values`` defaults to ``keys``.
- ``mask``: optional bool ``(B, R)`` (or ``(B, T, R)``), True where a position may be attended.
  Masked positions get exactly zero weight; a fully masked row gets zero weights and a zero
  context (never NaN).
- ``context``: ``(B, out_dim)`` or ``(B, T, out_dim)``; ``weights``: ``(B, R)`` or ``(B, T, R)``
  (multi-head modules return ``(B, H, R)`` / ``(B, H, T, R)``).

``out_dim`` is the size of the context: the value size (``value_dim``, default ``key_dim``) for the
single-head scores, whose context is a convex combination of the raw values, and
``attention_dim`` for ``multihead``, whose output projection maps back to its embedding size.

Key-side projections do not depend on the query, so ``prepare(keys, values)`` computes them once
per image batch; decoders keep the result in their state and pass it back as ``prepared=`` at
every step instead of re-projecting the features T times. ``prepare`` always returns ONE batch-first
tensor ``(B, R, P)`` computed position by position, so a decoder can ``index_select`` it like any
other state tensor and an incremental caller can extend it along R.

A module is three pieces, each overridable:
``score(query (B, T, Dq), prepared) -> (B, [H,] T, R)`` raw scores,
``mix(weights (B, [H,] T, R), values, prepared) -> (B, T, out_dim)`` the weighted read-out, and
``attend`` = masked softmax of ``score`` then ``mix``. Callers that need a custom normalisation
(e.g. causal co-attention, ``fusion.py``) use ``score`` and ``mix`` directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CHUNK_BYTES = 2 << 20  # blocks of the (..., R, A) hidden tensor that stay in a core's cache


def additive_scores(q: Tensor, prepared: Tensor, v: Tensor) -> Tensor:
    """Bahdanau scores v^T tanh(q + prepared): q (N, ..., 1, A) broadcast against prepared
    (N, ..., R, A), v (1, A) -> (N, ..., R).

    Computed as 2 v^T sigmoid(2q + 2 prepared) - sum(v), the same function: ATen's CPU tanh is
    about 6x slower than its sigmoid, and this form makes one pass over the hidden tensor for the
    sum and one in-place pass for the activation. Without autograd (decoding) the N rows run in
    cache-sized blocks: beam search's (B*K, R, A) hidden tensor is over 100 MB, and streaming
    it through memory three times cost 4x the blocked version."""
    v2, v_sum = 2 * v, v.sum()

    def scores(q, prepared):
        hidden = torch.add(2 * q, prepared, alpha=2).sigmoid_()  # (n, ..., R, A)
        return F.linear(hidden, v2).squeeze(-1) - v_sum  # (n, ..., R)

    shape = torch.broadcast_shapes(q.shape, prepared.shape)
    rows = max(1, _CHUNK_BYTES // (math.prod(shape[1:]) * prepared.element_size()))
    if torch.is_grad_enabled() or shape[0] <= rows or q.size(0) != prepared.size(0):
        return scores(q, prepared)
    return torch.cat([scores(q[i : i + rows], prepared[i : i + rows])
                      for i in range(0, shape[0], rows)])  # fmt: skip


def average_heads(weights: Tensor) -> Tensor:
    """One step's attention weights as decoders return them, (B, R) or per head (B, H, R), ->
    (B, R): what searches, losses and attention maps read."""
    return weights if weights.dim() == 2 else weights.mean(1)


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax that gives exactly zero weight to masked positions (and all-zero rows when a row
    is fully masked). ``mask`` broadcasts against ``scores``.

    Masked scores are set to the dtype's most negative finite value, not -inf, so a fully masked
    row softmaxes to a finite uniform row that the final ``* mask`` zeroes: no NaN appears in the
    forward or the backward pass."""
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask


class Attention(nn.Module):
    """Base class: subclasses implement ``score`` and optionally ``prepare`` / ``mix``."""

    out_dim: int  # size of the returned context
    multi_head: bool = False  # scores/weights carry a head dimension (B, H, T, R)

    def prepare(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        """Query-independent projection of the memory, (B, R, P); identity unless a subclass
        projects keys. ``values`` is only used by modules that project values too."""
        return keys

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        """(B, T, Dq), (B, R, P) -> unnormalised scores (B, [H,] T, R)."""
        raise NotImplementedError

    def mix(self, weights: Tensor, values: Tensor, prepared: Tensor) -> Tensor:
        """(B, [H,] T, R) weights -> context (B, T, out_dim)."""
        return weights @ values  # (B, T, Dv)

    def fusable_query(self) -> nn.Linear | None:
        """The linear layer ``score`` first applies to the query, when ``attend_projected`` can
        do the rest from its output; None when the query is read otherwise. A recurrent decoder
        can then run that layer inside its own per-step matmul on the hidden state
        (``LSTMDecoder``'s packed training path): one matmul a step instead of two."""
        return None

    def attend_projected(self, q: Tensor, values: Tensor, prepared: Tensor) -> tuple[Tensor, Tensor]:
        """One query per row, already through ``fusable_query()``: q (n, A), values (n, R, C),
        prepared (n, R, P) -> context (n, out_dim), weights (n, R). No mask."""
        raise NotImplementedError(f"{type(self).__name__} has no fusable query")

    def attend(
        self, query: Tensor, values: Tensor, prepared: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """query (B, T, Dq), mask (B, T or 1, R) -> context (B, T, out_dim), weights."""
        scores = self.score(query, prepared)  # (B, [H,] T, R)
        if mask is not None and self.multi_head:
            mask = mask.unsqueeze(1)  # (B, 1, T, R): same mask for every head
        weights = masked_softmax(scores, mask)
        return self.mix(weights, values, prepared), weights

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        mask: Tensor | None = None,
        prepared: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        # prepared (when given) already holds whatever the module projected from keys/values
        prepared = self.prepare(keys, values) if prepared is None else prepared
        values = keys if values is None else values
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # (B, T, Dq)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(1)  # (B, 1, R): same mask for every query
        context, weights = self.attend(q, values, prepared, mask)
        if single:
            weights = None if weights is None else weights.squeeze(-2)  # T sits before R
            return context.squeeze(1), weights
        return context, weights


class AdditiveAttention(Attention):
    """Bahdanau attention: score(q, k) = v^T tanh(W_q q + W_k k). prepare -> W_k k (B, R, A).

    Materialises a (B, T, R, A) hidden tensor: the most expensive score here."""

    def __init__(
        self, query_dim: int, key_dim: int, attention_dim: int, value_dim: int | None = None
    ):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attention_dim)
        self.key_proj = nn.Linear(key_dim, attention_dim)
        self.v = nn.Linear(attention_dim, 1, bias=False)
        self.out_dim = key_dim if value_dim is None else value_dim

    def prepare(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        return self.key_proj(keys)  # (B, R, A)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = self.query_proj(query)  # (B, T, A)
        return additive_scores(q.unsqueeze(2), prepared.unsqueeze(1), self.v.weight)  # (B, T, R)

    def fusable_query(self) -> nn.Linear:
        return self.query_proj  # W_q: the query enters the scores only through it

    def attend_projected(self, q: Tensor, values: Tensor, prepared: Tensor) -> tuple[Tensor, Tensor]:
        weights = additive_scores(q[:, None], prepared, self.v.weight).softmax(-1)  # (n, R)
        context = torch.bmm(weights[:, None], values).squeeze(1)  # (n, C)
        return context, weights


class DotAttention(Attention):
    """Luong dot attention: score(q, k) = q·k. prepare -> keys unchanged (B, R, Dk).

    A dot product needs equal sizes: when query_dim != key_dim the query is first mapped to
    key_dim by a bias-free linear layer (``query_proj``); otherwise ``query_proj`` is the
    identity and the module has no parameters. ``attention_dim`` is unused."""

    scaled = False

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        self.query_proj = (
            nn.Identity() if query_dim == key_dim else nn.Linear(query_dim, key_dim, bias=False)
        )
        self.scale = 1.0 / math.sqrt(key_dim) if self.scaled else 1.0
        self.out_dim = key_dim if value_dim is None else value_dim

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = self.query_proj(query) * self.scale  # (B, T, Dk)
        return q @ prepared.transpose(-2, -1)  # (B, T, R)


class ScaledDotAttention(DotAttention):
    """score(q, k) = q·k / sqrt(Dk): keeps the softmax out of saturation for large Dk."""

    scaled = True


class GeneralAttention(Attention):
    """Luong general (bilinear form): score(q, k) = q^T W k, W (Dq, Dk).

    W sits on the key side: prepare -> W k (B, R, Dq), once per batch, so a step is one dot
    product. ``attention_dim`` is unused."""

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int | None = None,
        value_dim: int | None = None,
    ):
        super().__init__()
        self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # weight is W
        self.out_dim = key_dim if value_dim is None else value_dim

    def prepare(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        return self.key_proj(keys)  # (B, R, Dq)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        return query @ prepared.transpose(-2, -1)  # (B, T, R)


class BilinearAttention(Attention):
    """Low-rank bilinear pooling score (cross-modal similarity):
    score(q, k) = w^T (tanh(U q + b_U) ⊙ tanh(V k + b_V)), U, V project to attention_dim.

    prepare -> tanh(V k + b_V) (B, R, A). Since w^T (a ⊙ b) = (w ⊙ a)·b, w is folded into the
    query side and the score is one matmul, with no (B, T, R, A) tensor. An outer scalar bias
    is left out: softmax is shift invariant, so it could not change the weights."""

    def __init__(
        self, query_dim: int, key_dim: int, attention_dim: int, value_dim: int | None = None
    ):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attention_dim)  # U
        self.key_proj = nn.Linear(key_dim, attention_dim)  # V
        self.w = nn.Parameter(torch.empty(attention_dim).uniform_(-1, 1) / math.sqrt(attention_dim))
        self.out_dim = key_dim if value_dim is None else value_dim

    def prepare(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        return torch.tanh(self.key_proj(keys))  # (B, R, A)

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        q = torch.tanh(self.query_proj(query)) * self.w  # (B, T, A)
        return q @ prepared.transpose(-2, -1)  # (B, T, R)


class MultiHeadAttention(Attention):
    """Multi-head cross-modal attention (text queries over image regions), parameterised like
    ``nn.MultiheadAttention(attention_dim, num_heads, kdim=key_dim, vdim=value_dim,
    batch_first=True)`` but with a query of any size: q_proj (Dq -> A), k_proj (Dk -> A),
    v_proj (Dv -> A), out_proj (A -> A), all with bias. out_dim = attention_dim.

    prepare -> cat(k_proj(keys), v_proj(values)) (B, R, 2A): keys AND values projected once,
    kept in one batch-first tensor so decoders can store and reorder it like any state.
    score -> per-head scores (B, H, T, R); weights are returned per head.

    Weights: decoders and search return attention maps, so by default (``need_weights=True``)
    the weights are computed explicitly and the context is ``weights @ v``; running
    ``scaled_dot_product_attention`` as well would redo the same softmax. With
    ``need_weights=False`` the context comes from ``F.scaled_dot_product_attention`` (fused
    kernels, no (B, H, T, R) tensor kept for backward) and the returned weights are None.
    Either way a fully masked query row gets a zero context (not out_proj's bias)."""

    multi_head = True

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        attention_dim: int,
        value_dim: int | None = None,
        num_heads: int = 1,
        need_weights: bool = True,
    ):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim {attention_dim} not divisible by {num_heads} heads")
        value_dim = key_dim if value_dim is None else value_dim
        self.num_heads = num_heads
        self.need_weights = need_weights
        self.q_proj = nn.Linear(query_dim, attention_dim)
        self.k_proj = nn.Linear(key_dim, attention_dim)
        self.v_proj = nn.Linear(value_dim, attention_dim)
        self.out_proj = nn.Linear(attention_dim, attention_dim)
        self.out_dim = attention_dim

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, L, A) -> (B, H, L, A/H)

    def prepare(self, keys: Tensor, values: Tensor | None = None) -> Tensor:
        values = keys if values is None else values
        return torch.cat([self.k_proj(keys), self.v_proj(values)], dim=-1)  # (B, R, 2A)

    def _query(self, query: Tensor) -> Tensor:
        q = self._heads(self.q_proj(query))  # (B, H, T, d)
        return q * (1.0 / math.sqrt(q.size(-1)))

    def score(self, query: Tensor, prepared: Tensor) -> Tensor:
        k = self._heads(prepared.chunk(2, dim=-1)[0])  # (B, H, R, d)
        return self._query(query) @ k.transpose(-2, -1)  # (B, H, T, R)

    def mix(self, weights: Tensor, values: Tensor, prepared: Tensor) -> Tensor:
        v = self._heads(prepared.chunk(2, dim=-1)[1])  # (B, H, R, d)
        heads = weights @ v  # (B, H, T, d)
        return self.out_proj(heads.transpose(1, 2).flatten(2))  # (B, T, A)

    def attend(
        self, query: Tensor, values: Tensor, prepared: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if self.need_weights:
            context, weights = super().attend(query, values, prepared, mask)
        else:
            k, v = (self._heads(p) for p in prepared.chunk(2, dim=-1))  # (B, H, R, d)
            q = self._heads(self.q_proj(query))  # (B, H, T, d); sdpa scales by 1/sqrt(d)
            attn_mask = None
            if mask is not None:
                # a fully masked row would give NaN: let it attend everywhere, zeroed below
                attn_mask = (mask | ~mask.any(-1, keepdim=True)).unsqueeze(1)  # (B, 1, T, R)
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
            context, weights = self.out_proj(heads.transpose(1, 2).flatten(2)), None
        if mask is not None:
            context = context * mask.any(-1, keepdim=True)  # (B, T, A); fully masked -> 0
        return context, weights


ATTENTIONS: dict[str, type[Attention]] = {
    "additive": AdditiveAttention,
    "dot": DotAttention,
    "scaled_dot": ScaledDotAttention,
    "general": GeneralAttention,
    "bilinear": BilinearAttention,
    "multihead": MultiHeadAttention,
}


def build_attention(
    name: str,
    query_dim: int,
    key_dim: int,
    attention_dim: int,
    num_heads: int = 1,
    value_dim: int | None = None,
) -> Attention:
    """Attention module by config name (``model.decoder.attention``).

    ``num_heads`` is used by ``multihead`` only (the single-head scores ignore it, so one config
    can carry it for every choice); ``value_dim`` defaults to ``key_dim``."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose one of {sorted(ATTENTIONS)}")
    extra = {"num_heads": num_heads} if name == "multihead" else {}
    return ATTENTIONS[name](query_dim, key_dim, attention_dim, value_dim=value_dim, **extra)
