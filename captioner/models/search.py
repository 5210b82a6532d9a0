"""Caption generation over the step interface (see ``decoder.py``): greedy, beam, sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from captioner.models.decoder import StepDecoder


@torch.no_grad()
def greedy_search(
    decoder: StepDecoder,
    features: Tensor,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_length: int = 20,
) -> tuple[Tensor, Tensor]:
    """Most likely token at every step, for a whole batch at once.

    Returns ``tokens (B, L)`` without BOS (EOS kept, padded with ``pad_id`` after it) and the
    attention of each generated token ``(B, L, R)`` (heads averaged for multi-head decoders).
    Finished rows stop changing; the loop ends when every row has emitted EOS.
    """
    B = features.size(0)
    state = decoder.init_state(features)
    last = torch.full((B,), bos_id, dtype=torch.long, device=features.device)
    finished = torch.zeros(B, dtype=torch.bool, device=features.device)
    tokens, attns = [], []
    for _ in range(max_length):
        logits, state, attn = decoder.step(last, state)  # (B, V)
        nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(finished, pad_id)
        tokens.append(nxt)
        attns.append(attn if attn.dim() == 2 else attn.mean(1))  # (B, R)
        finished |= nxt == eos_id
        last = nxt
        if finished.all():
            break
    return torch.stack(tokens, 1), torch.stack(attns, 1)
