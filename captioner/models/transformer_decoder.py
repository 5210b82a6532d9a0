"""Transformer decoder: causal self-attention over the caption, cross-modal attention over the
image's features (text queries, region keys/values), with a key/value cache for generation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.decoder import StepDecoder
from captioner.models.fusion import CoAttention, parse_fusion

FUSIONS = ("none", "coattention")


def _attend(q: Tensor, k: Tensor, v: Tensor, need_weights: bool, is_causal: bool = False):
    """q (..., L, d), k/v (..., S, d) -> context (..., L, d), weights (..., L, S) or None.
    The fused kernel when no weights are needed; the explicit softmax otherwise."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), None
    assert not is_causal, "weights are only returned for cross-attention"
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1)
    return weights @ v, weights


class DecoderLayer(nn.Module):
    """Pre-norm block: x += SelfAttn(LN(x)) (causal); x += CrossAttn(LN(x), features); x += MLP(LN(x)).

    With ``coattention`` the features a query at step t reads is first refined by attending over the
    text features LN(x)_{<=t} (``fusion.CoAttention``), so the cross-attention memory is per step:
    (B, T, R, D) in teacher forcing, (B, R, D) in a generation step."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float, coattention: bool):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.ln_self = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.self_out = nn.Linear(d_model, d_model)
        self.ln_cross = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)  # applied to the features (once per image)
        self.cross_out = nn.Linear(d_model, d_model)
        self.coattention = CoAttention(d_model, d_model) if coattention else None
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).movedim(-2, 1)  # (B, ..., L, D) -> (B, H, ..., L, d)

    @staticmethod
    def merge(x: Tensor) -> Tensor:
        return x.movedim(1, -2).flatten(-2)  # (B, H, ..., L, d) -> (B, ..., L, D)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, [T,] R, D) -> keys, values (B, H, [T,] R, d)."""
        return tuple(self.heads(m) for m in self.kv(memory).chunk(2, dim=-1))

    def self_attention(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None):
        """x (B, T, D) new positions; past (k, v) (B, H, t, d) cached ones. Returns the block
        output (B, T, D) and the updated (k, v) (B, H, t+T, d)."""
        q, k, v = (self.heads(p) for p in self.qkv(self.ln_self(x)).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # a single new query sees the whole cache; a block of queries sees its own past only
        causal = q.size(2) > 1
        if causal and past is not None and past[0].size(2) > 0:
            raise ValueError("a block of queries after a cache is not supported")
        a, _ = _attend(q, k, v, need_weights=False, is_causal=causal)
        return self.drop(self.self_out(self.merge(a))), (k, v)

    def cross_attention(self, h: Tensor, k: Tensor, v: Tensor, need_weights: bool, group: int = 1):
        """h (N, T, D) normed text; k/v (N/group, H, R, d) shared by ``group`` consecutive rows
        of h (k captions of one image), or (N, H, T, R, d) one memory per step (co-attention).
        Returns (N, T, D) and weights (N, H, T, R) or None."""
        q = self.heads(self.q(h))  # (N, H, T, d)
        N, H, T, d = q.shape
        if k.dim() == 5:  # per-step memory: every query is its own batch of one
            a, w = _attend(q.unsqueeze(-2), k, v, need_weights)  # (N, H, T, 1, d)
            a, w = a.squeeze(-2), (None if w is None else w.squeeze(-2))
        else:  # captions of one image become one longer query block: no feature expansion
            q = q.view(N // group, group, H, T, d).transpose(1, 2).reshape(N // group, H, group * T, d)
            a, w = _attend(q, k, v, need_weights)  # (N/g, H, g*T, d)
            a = a.view(N // group, H, group, T, d).transpose(1, 2).reshape(N, H, T, d)
            if w is not None:
                w = w.view(N // group, H, group, T, -1).transpose(1, 2).reshape(N, H, T, -1)
        return self.drop(self.cross_out(self.merge(a))), w

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.drop(self.ff(self.ln_ff(x)))


class TransformerDecoder(StepDecoder):
    """N pre-norm layers of causal self-attention + cross-modal multi-head attention over the
    image's features (B, R, C), learned positional embeddings, optionally tied input/output embeddings.

    The features are projected to ``d_model`` (Linear + LayerNorm) and, with ``encoder_layers`` > 0,
    refined by that many pre-norm ``nn.TransformerEncoderLayer`` blocks (regions attending to
    regions) before any text reads it.

    Generation keeps a key/value cache in the state, so one step costs one token:
    ``self_k``/``self_v`` (B, L, H, t, d) grow by one position per step and ``cross_k``/``cross_v``
    (B, L, H, R, d), the features' projections, are computed once in ``init_state`` and stay at
    one row per image (``static_state_keys``): the beams or samples of an image query them
    together as one block, as in teacher forcing. With
    ``fusion=coattention`` the refined features differ at every step, so the state holds the features
    ``memory`` (B, R, D) and each layer's co-attention text cache ``co{l}_*`` instead.

    ``attention_layer`` picks the layer whose cross-attention (heads averaged in ``forward``,
    per head (B, H, R) from ``step``) is returned for visualisation and the search.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        pad_id: int = 0,
        d_model: int = 256,
        num_layers: int = 3,
        num_heads: int = 8,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        max_length: int = 64,
        encoder_layers: int = 0,
        tie_embeddings: bool = True,
        fusion: str = "none",
        attention_layer: int = -1,
    ):
        super().__init__()
        coattention = "coattention" in parse_fusion(fusion, FUSIONS)
        self.vocab_size, self.max_length = vocab_size, max_length
        self.attention_layer = attention_layer % num_layers
        self.feature_proj = nn.Sequential(nn.Linear(encoder_dim, d_model), nn.LayerNorm(d_model))
        self.grid_encoder = None
        if encoder_layers > 0:
            layer = nn.TransformerEncoderLayer(
                d_model, num_heads, ff_dim, dropout, activation="gelu", batch_first=True,
                norm_first=True,
            )  # fmt: skip
            self.grid_encoder = nn.TransformerEncoder(
                layer, encoder_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
            )
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ff_dim, dropout, coattention) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_embeddings:
            self.head.weight = self.embedding.weight  # (V, D) both ways
        self.coattention = coattention
        self.static_state_keys = () if coattention else ("cross_k", "cross_v")

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])

    def encode_grid(self, features: Tensor) -> Tensor:
        memory = self.feature_proj(features)  # (B, R, D)
        return memory if self.grid_encoder is None else self.grid_encoder(memory)

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        T = tokens.size(1)
        if start + T > self.max_length:
            raise ValueError(f"caption position {start + T} beyond max_length {self.max_length}")
        pos = torch.arange(start, start + T, device=tokens.device)
        return self.drop(self.embedding(tokens) + self.position(pos))  # (B, T, D)

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. features (B, R, C); tokens (B*k, T) (BOS first), k captions per image
        sharing one image's features. Returns logits (B*k, T, V) and the cross-attention of
        ``attention_layer``, heads averaged (B*k, T, R)."""
        memory = self.encode_grid(features)  # (B, R, D)
        k = tokens.size(0) // features.size(0)
        if self.coattention and k > 1:  # refined features are per caption anyway
            memory = memory.repeat_interleave(k, 0)  # (B*k, R, D)
        x = self._embed(tokens, 0)  # (B*k, T, D)
        attn = None
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attention(x)[0]
            h = layer.ln_cross(x)
            if self.coattention:
                mk, mv = layer.memory_kv(layer.coattention(memory, h))  # (B*k, H, T, R, d)
                group = 1
            else:
                mk, mv = layer.memory_kv(memory)  # (B, H, R, d)
                group = k
            out, w = layer.cross_attention(h, mk, mv, i == self.attention_layer, group)
            x = x + out
            x = x + layer.feed_forward(x)
            attn = w.mean(1) if w is not None else attn  # (B*k, T, R)
        return self.head(self.ln_f(x)), attn

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        memory = self.encode_grid(features)  # (B, R, D)
        B, L = memory.size(0), len(self.layers)
        H = self.layers[0].num_heads
        empty = memory.new_zeros(B, L, H, 0, memory.size(-1) // H)  # (B, L, H, 0, d)
        state = {"self_k": empty, "self_v": empty}
        if self.coattention:
            state["memory"] = memory
        else:  # the features' keys/values, once per image for every step and beam
            kv = [layer.memory_kv(memory) for layer in self.layers]
            state["cross_k"] = torch.stack([k for k, _ in kv], 1)  # (B, L, H, R, d)
            state["cross_v"] = torch.stack([v for _, v in kv], 1)
        return state

    def step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict, Tensor]:
        t = state["self_k"].size(3)
        x = self._embed(tokens[:, None], t)  # (B, 1, D)
        # unbind once: L per-layer views whose backward is one stack, where indexing [:, i] per
        # layer would zero-fill a cache-sized gradient L times (self-critical sampling backprops
        # through every step)
        self_k, self_v = state["self_k"].unbind(1), state["self_v"].unbind(1)  # L x (B, H, t, d)
        if not self.coattention:
            cross_k, cross_v = state["cross_k"].unbind(1), state["cross_v"].unbind(1)  # L x (m, H, R, d)
            group = x.size(0) // cross_k[0].size(0)  # rows (beams, samples) per image
        new, ks, vs, attn = {}, [], [], None
        for i, layer in enumerate(self.layers):
            out, (k, v) = layer.self_attention(x, (self_k[i], self_v[i]))
            x = x + out
            ks.append(k)
            vs.append(v)
            h = layer.ln_cross(x)  # (B, 1, D)
            if self.coattention:
                prefix = f"co{i}_"
                co = {n[len(prefix):]: s for n, s in state.items() if n.startswith(prefix)} or None
                regions, co = layer.coattention.step(state["memory"], h[:, 0], co)  # (B, R, D)
                new.update({prefix + n: s for n, s in co.items()})
                mk, mv = layer.memory_kv(regions)  # (B, H, R, d)
                out, w = layer.cross_attention(h, mk, mv, i == self.attention_layer)
            else:
                out, w = layer.cross_attention(h, cross_k[i], cross_v[i], i == self.attention_layer,
                                               group)
            x = x + out
            x = x + layer.feed_forward(x)
            attn = w[:, :, 0] if w is not None else attn  # (B, H, R)
        state = {**state, **new, "self_k": torch.stack(ks, 1), "self_v": torch.stack(vs, 1)}
        return self.head(self.ln_f(x[:, 0])), state, attn  # (B, V)
