"""Cross-modal fusion blocks: caption-aware regions (co-attention) and the visual sentinel gate.

- ``CoAttention``: image regions attend over the text generated so far (causally), giving
  region features refined by the caption at every step.
- ``VisualSentinel`` + ``GatedFusion``: adaptive attention (Lu et al. 2017, "Knowing When to
  Look"), where a learned gate beta decides per step how much to rely on the image versus the
  language model's own memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioner.models.attention import build_attention, masked_softmax


def parse_fusion(fusion: str, allowed: tuple[str, ...]) -> set[str]:
    """A decoder's ``fusion`` setting, checked against the ones it ``allowed``:
    'coattention+gated' -> {'coattention', 'gated'}; 'none' -> set()."""
    if fusion not in allowed:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {list(allowed)}")
    return set() if fusion == "none" else set(fusion.split("+"))


class CoAttention(nn.Module):
    """Image-to-text co-attention, causal in the text.

    At text step t every region r_j (the query) attends over the text features t_0..t_t:

        alpha_ij^(t) = softmax_{i <= t} score(r_j, t_i)
        c_j^(t)      = sum_{i <= t} alpha_ij^(t) v(t_i)
        r_j^(t)      = LayerNorm(r_j + W c_j^(t))

    v is the attention's value read-out (t_i itself for the single-head scores, the value and
    output projections for ``multihead``). The residual keeps the visual content and the
    LayerNorm keeps the refined features on one scale whatever the amount of text seen.

    ``forward(regions (B, R, C), text (B, T, D), text_mask=None) -> refined (B, T, R, C)``: the
    teacher-forced form; refined[:, t] uses text positions <= t only. Scores are computed once,
    (B, [H,] R, T); the causal prefix softmax expands them to (B, [H,] T, R, T) and the context to
    (B, T, R, D): cost O(B T R (T + D + C)) memory, O(B T^2 R D) time, fine for the few regions
    and captions here (B=32, T=20, R=49, C=512: ~16M floats per (B, T, R, C) tensor).

    ``step(regions, text_t (B, D), state) -> (refined (B, R, C), state)``: the incremental form
    for generation; ``state`` (a dict of batch-first tensors, reorderable by beam search) holds
    the text so far and its prepared key/value projection, so each step projects one new text
    feature and attends over t+1 positions. ``last(regions, text (B, t+1, D))`` is the stateless
    form. Both equal the full form's slice ``refined[:, t]``.

    ``attention``: any name of ``attention.ATTENTIONS`` (default ``scaled_dot``), built with
    query_dim=region_dim, key_dim=text_dim; ``attention_dim`` defaults to text_dim.
    out_dim = region_dim."""

    def __init__(
        self,
        region_dim: int,
        text_dim: int,
        attention: str = "scaled_dot",
        attention_dim: int | None = None,
        num_heads: int = 1,
    ):
        super().__init__()
        attention_dim = text_dim if attention_dim is None else attention_dim
        self.attn = build_attention(attention, region_dim, text_dim, attention_dim, num_heads)
        self.proj = nn.Linear(self.attn.out_dim, region_dim)  # W
        self.norm = nn.LayerNorm(region_dim)
        self.out_dim = region_dim

    def forward(self, regions: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        R, T = regions.size(1), text.size(1)
        prepared = self.attn.prepare(text)  # (B, T, P): text projected once
        scores = self.attn.score(regions, prepared)  # (B, [H,] R, T): regions are the queries
        scores = scores.unsqueeze(-3)  # (B, [H,] 1, R, T): shared by every step t
        mask = torch.ones(T, T, dtype=torch.bool, device=text.device).tril()  # (t, i): i <= t
        mask = mask.unsqueeze(1)  # (T, 1, T)
        if text_mask is not None:
            mask = mask & text_mask[:, None, None, :]  # (B, T, 1, T)
        head_mask = mask.unsqueeze(1) if self.attn.multi_head and mask.dim() == 4 else mask
        weights = masked_softmax(scores, head_mask)  # (B, [H,] T, R, T)
        weights = weights.flatten(-3, -2)  # (B, [H,] T*R, T): every (step, region) is a query
        context = self.attn.mix(weights, text, prepared).unflatten(1, (T, R))  # (B, T, R, Do)
        if text_mask is not None:  # a step with no visible text reads nothing, as in attend
            context = context * mask.any(-1, keepdim=True)  # (B, T, 1, 1)
        return self.norm(regions.unsqueeze(1) + self.proj(context))  # (B, T, R, C)

    def _refine(self, regions: Tensor, text: Tensor, prepared: Tensor, mask: Tensor | None):
        # regions are R queries over the t+1 text positions seen so far
        context, _ = self.attn(regions, text, mask=mask, prepared=prepared)  # (B, R, Do)
        return self.norm(regions + self.proj(context))  # (B, R, C)

    def last(self, regions: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Refined regions for the last step of ``text`` (B, t+1, D) -> (B, R, C)."""
        return self._refine(regions, text, self.attn.prepare(text), text_mask)

    def step(
        self,
        regions: Tensor,
        text_t: Tensor,
        state: dict[str, Tensor] | None = None,
        mask_t: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One generation step: text_t (B, D) is the newest text feature, mask_t (B,) optional
        (False = padding). state None at t=0; returns (refined (B, R, C), new state) where the
        state is {"text": (B, t+1, D), "prepared": (B, t+1, P), "mask": (B, t+1)}."""
        text_t = text_t.unsqueeze(1)  # (B, 1, D)
        if mask_t is None:
            mask_t = torch.ones(text_t.size(0), dtype=torch.bool, device=text_t.device)
        new = {"text": text_t, "prepared": self.attn.prepare(text_t), "mask": mask_t[:, None]}
        if state is not None:  # prepare is position-wise, so it extends along the text axis
            new = {k: torch.cat([state[k], v], dim=1) for k, v in new.items()}
        return self._refine(regions, new["text"], new["prepared"], new["mask"]), new


class VisualSentinel(nn.Module):
    """The sentinel of adaptive attention: what the LSTM memory already knows, gated by the input

        g_t = sigmoid(W_x x_t + W_h h_{t-1}),   s_t = g_t * tanh(m_t)

    x_t (B, [T,] input_dim) the LSTM input, h_{t-1} its previous hidden state and m_t its new
    memory cell (B, [T,] hidden_dim) -> s_t (B, [T,] hidden_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, hidden_dim)  # W_x
        self.hidden_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)  # W_h

    def forward(self, x: Tensor, h_prev: Tensor, memory: Tensor) -> Tensor:
        gate = torch.sigmoid(self.input_proj(x) + self.hidden_proj(h_prev))
        return gate * torch.tanh(memory)


class GatedFusion(nn.Module):
    """Adaptive-attention gate (Lu et al. 2017): mix the visual context with the sentinel.

        s'    = P s                                   sentinel in context space (identity if D == C)
        z_c   = w^T tanh(W_c c  + W_g h)              score of looking at the image
        z_s   = w^T tanh(W_s s' + W_g h)              score of relying on the sentinel
        beta  = softmax([z_c, z_s])[1] = sigmoid(z_s - z_c)          in [0, 1]
        c_hat = beta s' + (1 - beta) c

    The paper puts the sentinel into the softmax over all k regions and beta is its share; here
    the k region scores are summarised by the already attended context c, so the choice is
    two-way and the gate works with any attention module.

    ``forward(h (B, [T,] D), context (B, [T,] C), sentinel (B, [T,] D)) -> (fused (B, [T,] C),
    beta (B, [T]))``. out_dim = context_dim."""

    def __init__(self, hidden_dim: int, context_dim: int, attention_dim: int):
        super().__init__()
        self.sentinel_proj = (
            nn.Identity() if hidden_dim == context_dim else nn.Linear(hidden_dim, context_dim)
        )  # P
        self.context_score = nn.Linear(context_dim, attention_dim, bias=False)  # W_c
        self.sentinel_score = nn.Linear(context_dim, attention_dim, bias=False)  # W_s
        self.hidden_score = nn.Linear(hidden_dim, attention_dim)  # W_g (shared by both scores)
        self.w = nn.Linear(attention_dim, 1, bias=False)
        self.out_dim = context_dim

    def forward(self, h: Tensor, context: Tensor, sentinel: Tensor) -> tuple[Tensor, Tensor]:
        s = self.sentinel_proj(sentinel)  # (B, [T,] C)
        g = self.hidden_score(h)  # (B, [T,] A)
        z_c = self.w(torch.tanh(self.context_score(context) + g))  # (B, [T,] 1)
        z_s = self.w(torch.tanh(self.sentinel_score(s) + g))  # (B, [T,] 1)
        beta = torch.sigmoid(z_s - z_c)  # (B, [T,] 1)
        fused = beta * s + (1 - beta) * context  # (B, [T,] C)
        return fused, beta.squeeze(-1)
