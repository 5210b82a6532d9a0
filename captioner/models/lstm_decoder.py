"""Show, Attend and Tell: an LSTM decoder with (by default additive) attention over the grid."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioner.models.attention import build_attention
from captioner.models.decoder import StepDecoder


class LSTMDecoder(StepDecoder):
    """Per step t: context = attend(h_{t-1}, regions); gate it by sigmoid(f_beta(h_{t-1}));
    h_t = LSTM([embed(y_{t-1}); gated context]); logits = fc(dropout(h_t)).

    The initial (h, c) come from the mean region feature, as in the paper. The key projection of
    the attention runs once per batch (``attention.prepare``), not once per step, and the vocabulary
    projection runs once over all steps in teacher-forced training.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_size: int = 512,
        attention_dim: int = 256,
        attention: str = "additive",
        num_heads: int = 1,
        dropout: float = 0.3,
        pad_id: int = 0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.attention = build_attention(
            attention, hidden_size, encoder_dim, attention_dim, num_heads=num_heads
        )
        ctx_dim = self.attention.out_dim
        self.init_h = nn.Linear(encoder_dim, hidden_size)
        self.init_c = nn.Linear(encoder_dim, hidden_size)
        self.f_beta = nn.Linear(hidden_size, ctx_dim)  # gating scalar per context channel
        self.lstm = nn.LSTMCell(embed_dim + ctx_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def init_state(self, features: Tensor) -> dict:
        mean = features.mean(1)  # (B, C)
        return {
            "h": self.init_h(mean),  # (B, H)
            "c": self.init_c(mean),
            "features": features,  # (B, R, C)
            "prepared": self.attention.prepare(features),
        }

    def _cell(self, emb: Tensor, state: dict) -> tuple[Tensor, Tensor, Tensor]:
        h, c = state["h"], state["c"]
        context, attn = self.attention(h, state["features"], prepared=state["prepared"])
        context = torch.sigmoid(self.f_beta(h)) * context  # (B, ctx)
        h, c = self.lstm(torch.cat([emb, context], dim=1), (h, c))
        return h, c, attn

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict, Tensor]:
        h, c, attn = self._cell(self.embedding(tokens), state)
        state = {**state, "h": h, "c": c}
        return self.fc(self.dropout(h)), state, attn  # (B, V)

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. features (B, R, C); tokens (B*k, T) input tokens (BOS first), where k
        captions per image share one image: the grid is projected once and then repeated.
        Returns logits (B*k, T, V) and head-averaged attention (B*k, T, R)."""
        state = self.init_state(features)
        k = tokens.size(0) // features.size(0)
        if k > 1:
            index = torch.arange(features.size(0), device=features.device).repeat_interleave(k)
            state = self.reorder_state(state, index)
        emb = self.embedding(tokens)  # (B*k, T, E)
        hs, attns = [], []
        for t in range(tokens.size(1)):
            h, c, attn = self._cell(emb[:, t], state)
            state["h"], state["c"] = h, c
            hs.append(h)
            attns.append(attn if attn.dim() == 2 else attn.mean(1))
        hs = torch.stack(hs, 1)  # (B*k, T, H)
        return self.fc(self.dropout(hs)), torch.stack(attns, 1)
