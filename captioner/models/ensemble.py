"""Several trained captioners decoded as one: the search scores each next word by the mean of
the members' log-probabilities (a renormalised geometric mean of their distributions).

An ensemble is a ``Captioner`` like any other, so greedy, beam, sampling, the bans, the feature
cache, ``caption.py`` and ``evaluate.py`` need nothing new:

- its decoder, ``EnsembleDecoder``, speaks the step interface (``decoder.py``) by running every
  member's ``step`` and keeping their states side by side under prefixed keys (``"0.h"``,
  ``"1.cross_k"``, ...), each member's static entries still one row per image;
- its encoder runs each *distinct* member encoder once and concatenates their grids along the
  channels, ``(B, R, C_0 + C_1 + ...)``; each member decoder reads its own channel slice. Members
  trained on the same frozen encoder (the usual case: one cached feature set, several decoders)
  share it, so the ensemble's features are exactly that encoder's (and its feature cache's).

Members must share the vocabulary (the same tokenizer) and, when their encoders differ, the grid
size R (the same input size and stride); the checkpoint loader checks both with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from captioner.models.attention import average_heads
from captioner.models.captioner import Captioner
from captioner.models.decoder import StepDecoder


class ConcatEncoder(nn.Module):
    """Distinct encoders run on the same images, grids concatenated along the channels."""

    def __init__(self, encoders: Sequence[nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.out_dim = sum(e.out_dim for e in encoders)
        # the feature cache serves frozen encoders only (``data.datamodule._cache_encoder``)
        self.trainable = any(getattr(e, "trainable", True) for e in encoders)

    def identity(self) -> dict:
        """What the feature cache keys on besides the weights: each member's own settings
        (which layer, grid size, class token), so two ensembles differing there never share."""
        return {"class": type(self).__name__,
                "members": [e.identity() if hasattr(e, "identity") else {"class": type(e).__name__}
                            for e in self.encoders]}

    def forward(self, images: Tensor) -> Tensor:
        grids = [e(images) for e in self.encoders]  # each (B, R_i, C_i)
        sizes = {g.size(1) for g in grids}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members' encoders give different grids ({sorted(sizes)} "
                             "regions): they cannot share one input; use members trained on "
                             "encoders with the same grid")
        return torch.cat(grids, -1)  # (B, R, sum C_i)


class EnsembleDecoder(StepDecoder):
    """``members`` decoders, member i reading channels ``slices[i]`` of the features."""

    def __init__(self, members: Sequence[StepDecoder], slices: Sequence[tuple[int, int]]):
        super().__init__()
        sizes = {m.vocab_size for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.slices = [tuple(s) for s in slices]
        self.vocab_size = sizes.pop()
        self.static_state_keys = tuple(f"{i}.{k}" for i, m in enumerate(members)
                                       for k in m.static_state_keys)

    def _split(self, state: dict) -> list[dict]:
        """The flat state (or part of it) -> one dict per member, prefixes removed."""
        parts = [{} for _ in self.members]
        for key, value in state.items():
            i, _, name = key.partition(".")
            parts[int(i)][name] = value
        return parts

    @staticmethod
    def _join(parts: list[dict]) -> dict:
        return {f"{i}.{k}": v for i, part in enumerate(parts) for k, v in part.items()}

    def _features(self, features: Tensor, i: int) -> Tensor:
        start, end = self.slices[i]
        return features[..., start:end]  # (B, R, C_i)

    def init_state(self, features: Tensor) -> dict:
        return self._join([m.init_state(self._features(features, i))
                           for i, m in enumerate(self.members)])

    @staticmethod
    def _mean(log_probs: list[Tensor]) -> Tensor:
        # float32 at least: half-precision log-probs are summed over many steps by the search
        return torch.stack([lp.float() for lp in log_probs]).mean(0)

    @staticmethod
    def _attention(attns: list[Tensor]) -> Tensor:
        # one map per word for attention pictures: the members' mean where they share the grid
        maps = [average_heads(a) for a in attns]  # (B, R_i) each
        return torch.stack(maps).mean(0) if len({m.shape for m in maps}) == 1 else maps[0]

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict, Tensor]:
        log_probs, states, attns = [], [], []
        for member, part in zip(self.members, self._split(state)):
            logits, part, attn = member.step(tokens, part)  # (B, V)
            log_probs.append(logits.float().log_softmax(-1))
            states.append(part)
            attns.append(attn)
        return self._mean(log_probs), self._join(states), self._attention(attns)

    def reorder_state(self, state: dict, index: Tensor) -> dict:
        # each member reorders its own entries: a member may override ``reorder_state``
        return self._join([m.reorder_state(part, index) if part else part
                           for m, part in zip(self.members, self._split(state))])

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: the members' mean log-probs (B*k, T, V) — log-probs where other
        decoders return logits: cross-entropy and argmax read both alike — and their mean
        attention (B*k, T, R) where they share the grid (heads already averaged by each)."""
        outs = [m(self._features(features, i), tokens) for i, m in enumerate(self.members)]
        log_probs = self._mean([logits.float().log_softmax(-1) for logits, _ in outs])
        attns = [a for _, a in outs if a is not None]
        if not attns:
            return log_probs, None
        same = len({a.shape for a in attns}) == 1
        return log_probs, (torch.stack(attns).mean(0) if same else attns[0])


def _same_encoder(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b) or getattr(a, "out_dim", None) != getattr(b, "out_dim", None):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def ensemble(models: Sequence[Captioner], encoder_keys: Sequence[str] | None = None) -> Captioner:
    """One ``Captioner`` decoding ``models`` together (their modules are shared, not copied).

    Encoders are shared when they are the same: same class and weights and, where given, the same
    ``encoder_keys`` entry (a description of what the weights alone do not fix, e.g. the stored
    encoder config: which layer's grid, the class-token handling). Special-token and bad-ending
    ids come from the first model; the caller checks the vocabularies agree."""
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    keys = list(encoder_keys) if encoder_keys is not None else [None] * len(models)
    if len(keys) != len(models):
        raise ValueError(f"{len(keys)} encoder keys for {len(models)} models")
    distinct, owner = [], []  # distinct encoders; index into it per member
    for model, key in zip(models, keys):
        for j, (enc, enc_key) in enumerate(distinct):
            if enc_key == key and _same_encoder(enc, model.encoder):
                owner.append(j)
                break
        else:
            owner.append(len(distinct))
            distinct.append((model.encoder, key))
    encoders = [enc for enc, _ in distinct]
    starts = [sum(e.out_dim for e in encoders[:j]) for j in range(len(encoders))]
    slices = [(starts[j], starts[j] + encoders[j].out_dim) for j in owner]
    decoder = EnsembleDecoder([m.decoder for m in models], slices)
    encoder = encoders[0] if len(encoders) == 1 else ConcatEncoder(encoders)
    first = models[0]
    return Captioner(encoder, lambda **_: decoder, decoder.vocab_size, first.pad_id, first.bos_id,
                     first.eos_id, first.unk_id, first.bad_ending_ids)
