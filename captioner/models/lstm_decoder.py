"""Show, Attend and Tell: an LSTM decoder with (by default additive) attention over the image regions,
optionally with co-attention (caption-aware regions) and the adaptive-attention gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.models.attention import average_heads, build_attention
from captioner.models.decoder import StepDecoder
from captioner.models.fusion import CoAttention, GatedFusion, VisualSentinel, parse_fusion
from captioner.models.step_linear import DeferredLinear

FUSIONS = ("none", "coattention", "gated", "coattention+gated")


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """nn.LSTMCell's update from its pre-activations: gates (n, 4H) in the order input, forget,
    cell, output, and the memory c (n, H) -> the new (h, c), each (n, H)."""
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTMDecoder(StepDecoder):
    """Per step t: context = attend(h_{t-1}, regions); gate it by sigmoid(f_beta(h_{t-1}));
    h_t = LSTM([embed(y_{t-1}); gated context]); logits = fc(dropout(h_t)).

    The initial (h, c) come from the mean region feature, as in the paper. The key projection of
    the attention runs once per batch (``attention.prepare``), not once per step, and the vocabulary
    projection runs once over all steps in teacher-forced training.

    ``fusion`` (``model.decoder.fusion``):
    - ``coattention``: before attending at step t the regions are refined by attending over the
      embeddings of the caption so far, tokens <= t (``fusion.CoAttention``, incremental in
      ``step``); the attention reads the refined regions.
    - ``gated``: adaptive attention (Lu et al. 2017): a visual sentinel from the new LSTM memory
      and a gate beta choose per step between the visual context and the language state:
      logits = fc(dropout(h_t + W c_hat)), c_hat = beta s_t + (1 - beta) context.
    - ``coattention+gated``: both. ``none`` (default) is plain Show, Attend and Tell.
    """

    default_alpha_c = 1.0  # Show, Attend and Tell's doubly stochastic attention

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
        fusion: str = "none",
    ):
        super().__init__()
        fusions = parse_fusion(fusion, FUSIONS)
        self.vocab_size = vocab_size
        self.pad_id = pad_id
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
        # regions (queries) over the caption's embeddings (keys)
        self.coattention = CoAttention(encoder_dim, embed_dim) if "coattention" in fusions else None
        # state entries that depend only on the image: searches keep them at one row per image
        # while the rest has G rows per image (beams, samples; image-major), see ``_cell``.
        # Co-attention refines the features per caption, so there every row needs its own.
        self.static_state_keys = ("features", "prepared") if self.coattention is None else ()
        self.sentinel = self.gate = self.gate_out = None
        if "gated" in fusions:
            self.sentinel = VisualSentinel(embed_dim + ctx_dim, hidden_size)
            self.gate = GatedFusion(hidden_size, ctx_dim, attention_dim)
            self.gate_out = nn.Linear(ctx_dim, hidden_size)  # c_hat into the hidden space

    def init_state(self, features: Tensor) -> dict:
        mean = features.mean(1)  # (B, C)
        state = {
            "h": self.init_h(mean),  # (B, H)
            "c": self.init_c(mean),
            "features": features,  # (B, R, C)
        }
        if self.coattention is None:  # co-attended regions change every step: nothing to cache
            state["prepared"] = self.attention.prepare(features)
        return state

    def _cell(self, emb: Tensor, regions: Tensor, prepared: Tensor, state: dict):
        """One LSTM step reading ``regions`` (B, R, C) -> (h, c, output (B, H), attn)."""
        h, c = state["h"], state["c"]
        n, m = h.size(0), regions.size(0)
        if n == m:
            context, attn = self.attention(h, regions, prepared=prepared)  # (B, ctx)
        else:  # G = n/m rows per image (image-major) query their image's features together
            context, attn = self.attention(h.view(m, n // m, -1), regions, prepared=prepared)
            if attn.dim() == 4:  # multi-head (m, heads, G, R) -> (m, G, heads, R)
                attn = attn.transpose(1, 2)
            context, attn = context.reshape(n, -1), attn.reshape(n, *attn.shape[2:])
        context = torch.sigmoid(self.f_beta(h)) * context  # (B, ctx)
        x = torch.cat([emb, context], dim=1)  # (B, E + ctx)
        lstm = self.lstm  # its weights; the update is ``lstm_update``, shared with the packed path
        gates = F.linear(h, lstm.weight_hh, lstm.bias_hh) + F.linear(x, lstm.weight_ih, lstm.bias_ih)
        h_new, c_new = lstm_update(gates, c)  # (B, H) each
        out = h_new
        if self.gate is not None:
            sentinel = self.sentinel(x, h, c_new)  # (B, H)
            fused, _ = self.gate(h_new, context, sentinel)  # (B, ctx)
            out = h_new + self.gate_out(fused)
        return h_new, c_new, out, attn

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict, Tensor]:
        emb = self.embedding(tokens)  # (B, E)
        state = dict(state)
        if self.coattention is None:
            regions, prepared = state["features"], state["prepared"]
        else:
            co_state = {k[3:]: state.pop(k) for k in list(state) if k.startswith("co_")} or None
            regions, co_state = self.coattention.step(state["features"], emb, co_state)  # (B, R, C)
            state.update({f"co_{k}": v for k, v in co_state.items()})
            prepared = self.attention.prepare(regions)
        h, c, out, attn = self._cell(emb, regions, prepared, state)
        state.update(h=h, c=c)
        return self.fc(self.dropout(out)), state, attn  # (B, V)

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. features (B, R, C); tokens (B*k, T) input tokens (BOS first), where k
        captions per image share one image: the features are projected once per image.
        Returns logits (B*k, T, V) and head-averaged attention (B*k, T, R).

        In training mode a row's positions after its last non-pad token cost no compute: their
        logits and attention are zeros (the loss ignores them, their targets being pad). Every
        other position, and in eval mode every position, equals running ``step`` token by token."""
        if self.coattention is None and self.gate is None:
            return self._forward_packed(features, tokens)
        state = self.expand_state(self.init_state(features), tokens.size(0) // features.size(0))
        emb = self.embedding(tokens)  # (B*k, T, E)
        if self.coattention is not None:
            # every step's refined regions at once, and their key projections in one call
            regions = self.coattention(state["features"], emb)  # (B*k, T, R, C)
            prepared = self.attention.prepare(regions)  # (B*k, T, R, P)
        outs, attns = [], []
        for t in range(tokens.size(1)):
            if self.coattention is None:
                step_regions, step_prepared = state["features"], state["prepared"]
            else:
                step_regions, step_prepared = regions[:, t], prepared[:, t]
            h, c, out, attn = self._cell(emb[:, t], step_regions, step_prepared, state)
            state["h"], state["c"] = h, c
            outs.append(out)
            attns.append(average_heads(attn))  # (B*k, R)
        outs = torch.stack(outs, 1)  # (B*k, T, H)
        return self.fc(self.dropout(outs)), torch.stack(attns, 1)

    def _forward_packed(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Plain Show-Attend-Tell teacher forcing, packed like ``nn.utils.rnn.PackedSequence``:
        rows sorted by length (longest first), step t runs only on the n_t rows still active (a
        prefix of the sorted batch, so slicing copies nothing). The embedding half of the LSTM's
        input matmul runs once for all steps; the vocabulary projection once over the packed
        (active) positions only; the features' key projection once per image."""
        N, T = tokens.shape
        B, R = features.size(0), features.size(1)
        dev = tokens.device
        H = self.lstm.hidden_size
        E = self.embedding.embedding_dim
        # length = last non-pad position + 1 (interior pads, if any, are still computed); in eval
        # mode every position runs, so forward equals stepping even on trailing pad inputs
        if self.training:
            pos = torch.arange(1, T + 1, device=dev)
            lengths = ((tokens != self.pad_id) * pos).amax(1)  # (N,)
        else:
            lengths = torch.full((N,), T, device=dev)
        lengths, order = lengths.sort(descending=True, stable=True)
        counts = (lengths[None, :] > torch.arange(T, device=dev)[:, None]).sum(1).tolist()  # n_t
        image = torch.div(order, N // B, rounding_mode="floor")  # (N,) image of each sorted row

        mean = features.mean(1)  # (B, C)
        h = self.init_h(mean).index_select(0, image)  # (N, H)
        c = self.init_c(mean).index_select(0, image)
        regions = features.index_select(0, image)  # (N, R, C)
        prepared = self.attention.prepare(features).index_select(0, image)  # (N, R, P)

        w_ih, w_hh = self.lstm.weight_ih, self.lstm.weight_hh  # (4H, E + ctx), (4H, H)
        w_emb, w_ctx = w_ih[:, :E], w_ih[:, E:]
        bias = self.lstm.bias_ih + self.lstm.bias_hh
        emb = self.embedding(tokens.index_select(0, order).t())  # (T, N, E) time-major
        gates_in = torch.addmm(bias, emb.reshape(T * N, E), w_emb.t()).view(T, N, 4 * H)
        # one unbind, not T indexings: each of those would scatter its gradient into a zero-filled
        # (T, N, 4H) buffer in backward
        gates_in = gates_in.unbind(0)  # T x (N, 4H)

        # When the attention reads h through one linear layer (additive: W_q), everything read
        # from h (recurrent gates, context gate, attention query) is one matmul per step,
        # forward and backward, instead of three.
        att = self.attention
        query_layer = att.fusable_query()
        fused = query_layer is not None
        if fused:
            q_bias = query_layer.bias
            if q_bias is None:
                q_bias = query_layer.weight.new_zeros(query_layer.out_features)
            w_h = torch.cat([w_hh, self.f_beta.weight, query_layer.weight])  # (4H+C+A, H)
            b_h = torch.cat([torch.zeros_like(bias), self.f_beta.bias, q_bias])
            splits = [4 * H, self.f_beta.out_features, query_layer.out_features]
        if torch.is_autocast_enabled(dev.type):
            # autocast casts only leaf weights once; these step-invariant operands are not
            # leaves, so cast them here once instead of at every step
            low = torch.get_autocast_dtype(dev.type)
            w_ctx, regions, prepared = w_ctx.to(low), regions.to(low), prepared.to(low)
            if fused:
                w_h, b_h = w_h.to(low), b_h.to(low)
        deferred = fused and torch.is_grad_enabled()
        if deferred:  # per-step matmuls whose weight gradients are summed once, after all steps
            from_h_linear, from_ctx_linear = DeferredLinear(w_h), DeferredLinear(w_ctx)

        outs, attns = [], []
        for t, n in enumerate(counts):
            if n == 0:
                break
            if n < h.size(0):  # rows are sorted: the active ones are a prefix
                # slice the features only when n shrinks: each slice costs a full-size zero-filled
                # gradient in backward, once per distinct n instead of once per step
                h, c, regions, prepared = h[:n], c[:n], regions[:n], prepared[:n]
            if fused:
                if deferred:
                    from_h = from_h_linear(h) + b_h
                else:
                    from_h = torch.addmm(b_h, h, w_h.t())
                hh, gate, q = from_h.split(splits, 1)  # (n, 4H | C | A)
                context, attn = att.attend_projected(q, regions, prepared)  # (n, C), (n, R)
                context = torch.sigmoid(gate) * context
                from_ctx = from_ctx_linear(context) if deferred else context @ w_ctx.t()
                gates = gates_in[t][:n] + from_ctx + hh  # (n, 4H)
            else:
                context, attn = att(h, regions, prepared=prepared)  # (n, ctx)
                context = torch.sigmoid(self.f_beta(h)) * context
                gates = gates_in[t][:n] + context @ w_ctx.t() + h @ w_hh.t()  # (n, 4H)
            h, c = lstm_update(gates, c)
            outs.append(h)
            attns.append(average_heads(attn))  # (n, R)
        packed = torch.cat(outs)  # (P, H) time-major packed positions
        logits = self.fc(self.dropout(packed))  # (P, V)
        attn = torch.cat(attns)  # (P, R)
        # packed position p = (t, j) -> output row order[j]*T + t
        t_idx = torch.repeat_interleave(
            torch.arange(len(outs), device=dev), torch.tensor(counts[: len(outs)], device=dev)
        )
        j_idx = torch.cat([torch.arange(n, device=dev) for n in counts[: len(outs)]])
        flat = order[j_idx] * T + t_idx  # (P,)
        out_logits = logits.new_zeros(N * T, logits.size(-1)).index_copy(0, flat, logits)
        out_attn = attn.new_zeros(N * T, R).index_copy(0, flat, attn)
        return out_logits.view(N, T, -1), out_attn.view(N, T, R)
