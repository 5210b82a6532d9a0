"""The packed teacher-forcing path of ``LSTMDecoder`` (sorted rows, finished rows skipped, input
matmul precomputed) gives the loss and gradients of a plain per-step reference."""

import pytest
import torch
import torch.nn.functional as F

from captioner.models.lstm_decoder import LSTMDecoder

V, R, C, PAD = 31, 6, 10, 0


def reference_forward(d: LSTMDecoder, features, tokens):
    """Straightforward Show-Attend-Tell: every row, every step, full batch."""
    k = tokens.size(0) // features.size(0)
    feats = features.repeat_interleave(k, 0)  # (N, R, C)
    mean = feats.mean(1)
    h, c = d.init_h(mean), d.init_c(mean)
    logits, attns = [], []
    for t in range(tokens.size(1)):
        context, attn = d.attention(h, feats)  # key projection recomputed: plain on purpose
        context = torch.sigmoid(d.f_beta(h)) * context
        x = torch.cat([d.embedding(tokens[:, t]), context], 1)
        h, c = d.lstm(x, (h, c))
        logits.append(d.fc(h))
        attns.append(attn if attn.dim() == 2 else attn.mean(1))
    return torch.stack(logits, 1), torch.stack(attns, 1)


def padded_captions(lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), T), PAD)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, V, (n,), generator=g)
    return tokens


def loss_of(logits, attn, targets):
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=PAD)
    real = (targets != PAD).unsqueeze(-1)
    return ce + ((1 - (attn * real).sum(1)) ** 2).mean()  # the attention penalty reads attn


@pytest.mark.parametrize("attention", ["additive", "multihead"])
@pytest.mark.parametrize("k", [1, 2])
def test_packed_forward_matches_reference_loss_and_grads(attention, k):
    torch.manual_seed(0)
    d = LSTMDecoder(V, C, embed_dim=8, hidden_size=12, attention_dim=8, attention=attention,
                    num_heads=2 if attention == "multihead" else 1, dropout=0.0, pad_id=PAD)
    d.train()
    features = torch.randn(3, R, C, dtype=torch.float64)
    d.double()
    lengths = [5, 9, 2, 9, 1, 7][: 3 * k]  # unsorted, ties, a 1-token row
    captions = padded_captions(lengths, T=10)  # (N, T) BOS.. then pads
    inputs, targets = captions[:, :-1], captions[:, 1:]

    logits, attn = d(features, inputs)
    assert logits.shape == (3 * k, 9, V) and attn.shape == (3 * k, 9, R)
    loss = loss_of(logits, attn, targets)
    grads = torch.autograd.grad(loss, list(d.parameters()), allow_unused=True)

    ref_logits, ref_attn = reference_forward(d, features, inputs)
    ref_loss = loss_of(ref_logits, ref_attn, targets)
    ref_grads = torch.autograd.grad(ref_loss, list(d.parameters()), allow_unused=True)

    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, _), g, rg in zip(d.named_parameters(), grads, ref_grads):
        g = torch.zeros_like(rg) if g is None and rg is not None else g
        rg = torch.zeros_like(g) if rg is None and g is not None else rg
        if g is not None:
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5, msg=name)
    # real positions equal the reference; skipped ones (after the last token) are zeros
    real = inputs != PAD
    torch.testing.assert_close(logits[real], ref_logits[real])
    assert (logits[~real] == 0).all() and (attn[~real] == 0).all()


def test_float32_and_eval_mode_compute_every_position():
    torch.manual_seed(0)
    d = LSTMDecoder(V, C, embed_dim=8, hidden_size=12, attention_dim=7, dropout=0.0).eval()
    features = torch.randn(2, R, C)
    inputs = padded_captions([4, 7], T=8)
    logits, attn = d(features, inputs)
    ref_logits, ref_attn = reference_forward(d, features, inputs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_gradients_close_to_float32():
    """Under bf16 autocast the packed path (step-invariant operands cast once, weight gradients
    of all steps summed in one matmul) gives the float32 gradients to bf16 precision."""
    torch.manual_seed(0)
    d = LSTMDecoder(V, C, embed_dim=8, hidden_size=12, attention_dim=8, dropout=0.0, pad_id=PAD)
    features = torch.randn(3, R, C)
    captions = padded_captions([5, 9, 2, 9, 1, 7], T=10)
    inputs, targets = captions[:, :-1], captions[:, 1:]

    def grads(bf16):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits, attn = d(features, inputs)
            loss = loss_of(logits.float(), attn.float(), targets)
        return loss, torch.autograd.grad(loss, list(d.parameters()), allow_unused=True)

    loss32, g32 = grads(False)
    loss16, g16 = grads(True)
    torch.testing.assert_close(loss16, loss32, atol=0.05, rtol=0.02)
    for (name, _), a, b in zip(d.named_parameters(), g16, g32):
        if b is not None:
            assert a is not None and a.dtype == b.dtype, name
            rel = (a - b).norm() / b.norm().clamp_min(1e-6)
            assert rel < 0.05, (name, float(rel))
