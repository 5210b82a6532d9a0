import math

import pytest
import torch
from torch import nn

from captioner.models.attention import ATTENTIONS, build_attention, masked_softmax

B, T, R, DQ, DK, DV, A, H = 2, 3, 5, 6, 4, 7, 8, 2
SINGLE = ["additive", "dot", "scaled_dot", "general", "bilinear"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def direct_score(attn, name, q, k):
    """score(q (Dq,), k (Dk,)) written out from the module's parameters, one pair at a time."""
    if name == "additive":
        hidden = attn.query_proj.weight @ q + attn.query_proj.bias
        hidden = hidden + attn.key_proj.weight @ k + attn.key_proj.bias
        return attn.v.weight[0] @ torch.tanh(hidden)
    if name in ("dot", "scaled_dot"):
        qk = q if q.numel() == k.numel() else attn.query_proj.weight @ q
        s = qk @ k
        return s / math.sqrt(k.numel()) if name == "scaled_dot" else s
    if name == "general":
        return q @ attn.key_proj.weight @ k  # q^T W k
    if name == "bilinear":
        u = torch.tanh(attn.query_proj.weight @ q + attn.query_proj.bias)
        v = torch.tanh(attn.key_proj.weight @ k + attn.key_proj.bias)
        return attn.w @ (u * v)
    raise AssertionError(name)


def direct_attention(attn, name, query, keys, values, mask):
    """(B, T, Dq) queries -> context (B, T, Dv), weights (B, T, R) by loops."""
    scores = torch.empty(B, query.size(1), R)
    for b in range(B):
        for t in range(query.size(1)):
            for r in range(R):
                scores[b, t, r] = direct_score(attn, name, query[b, t], keys[b, r])
    weights = torch.zeros_like(scores)
    for b in range(B):
        for t in range(query.size(1)):
            m = mask[b] if mask.dim() == 2 else mask[b, t]
            if m.any():
                weights[b, t, m] = torch.softmax(scores[b, t, m], -1)
    return torch.einsum("btr,brd->btd", weights, values), weights


def random_mask(*shape):
    mask = torch.rand(*shape) > 0.4
    mask[..., 0] = True  # at least one visible position per row
    return mask


@pytest.mark.parametrize("name", SINGLE)
@pytest.mark.parametrize("query_dim", [DQ, DK])  # projected query / same sizes for dot
@pytest.mark.parametrize("mask_dims", [2, 3])
def test_scores_match_direct_computation(name, query_dim, mask_dims):
    attn = build_attention(name, query_dim, DK, A, value_dim=DV)
    query, keys, values = torch.randn(B, T, query_dim), torch.randn(B, R, DK), torch.randn(B, R, DV)
    mask = random_mask(B, R) if mask_dims == 2 else random_mask(B, T, R)
    with torch.no_grad():
        want_c, want_w = direct_attention(attn, name, query, keys, values, mask)
        got_c, got_w = attn(query, keys, values, mask=mask)  # (B, T, Dq) queries
        torch.testing.assert_close(got_w, want_w)
        torch.testing.assert_close(got_c, want_c)
        step_mask = mask if mask_dims == 2 else mask[:, 1]
        got_c, got_w = attn(query[:, 1], keys, values, mask=step_mask)  # (B, Dq) query
        torch.testing.assert_close(got_w, want_w[:, 1])
        torch.testing.assert_close(got_c, want_c[:, 1])
    assert attn.out_dim == got_c.size(-1) == DV


def test_dot_projection_only_when_sizes_differ():
    assert isinstance(build_attention("dot", DK, DK, A).query_proj, nn.Identity)
    assert not list(build_attention("scaled_dot", DK, DK, A).parameters())
    assert build_attention("dot", DQ, DK, A).query_proj.weight.shape == (DK, DQ)


@pytest.mark.parametrize("name", list(ATTENTIONS))
@pytest.mark.parametrize("timed", [False, True])
def test_masking_and_normalisation(name, timed):
    attn = build_attention(name, DQ, DK, A, num_heads=H)
    query = torch.randn(B, T, DQ) if timed else torch.randn(B, DQ)
    keys = torch.randn(B, R, DK)
    mask = random_mask(B, R)
    mask[1] = False  # second image fully masked
    context, weights = attn(query, keys, mask=mask)
    m = mask[:, None, :] if attn.multi_head else mask  # weights (B, [H,] [T,] R)
    m = m.unsqueeze(-2) if timed else m
    m = m.expand_as(weights)
    assert not torch.isnan(weights).any() and not torch.isnan(context).any()
    assert (weights[~m] == 0).all()  # exactly zero, not tiny
    torch.testing.assert_close(weights[0].sum(-1), torch.ones_like(weights[0].sum(-1)))
    assert (weights[1] == 0).all() and (context[1] == 0).all()
    assert context.size(-1) == attn.out_dim


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_prepared_equals_unprepared(name):
    attn = build_attention(name, DQ, DK, A, num_heads=H, value_dim=DV)
    query, keys, values = torch.randn(B, DQ), torch.randn(B, R, DK), torch.randn(B, R, DV)
    mask = random_mask(B, R)
    prepared = attn.prepare(keys, values)
    assert prepared.shape[:2] == (B, R)  # batch-first: reorderable decoder state
    want = attn(query, keys, values, mask=mask)
    got = attn(query, keys, values, mask=mask, prepared=prepared)
    torch.testing.assert_close(got, want)
    # the LSTM decoder's call: values default to keys
    attn = build_attention(name, DQ, DK, A, num_heads=H)
    prepared = attn.prepare(keys)
    torch.testing.assert_close(attn(query, keys, mask=None, prepared=prepared), attn(query, keys))


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_gradients_flow(name):
    attn = build_attention(name, DQ, DK, A, num_heads=H)
    query = torch.randn(B, T, DQ, requires_grad=True)
    keys = torch.randn(B, R, DK, requires_grad=True)
    mask = random_mask(B, T, R)
    mask[1, 0] = False  # a fully masked row must not poison the gradients
    context, weights = attn(query, keys, mask=mask)
    (context.square().sum() + weights.square().sum()).backward()
    grads = [query.grad, keys.grad] + [p.grad for p in attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert query.grad.abs().sum() > 0 and keys.grad.abs().sum() > 0


def _torch_mha(attn, same_dims):
    mha = nn.MultiheadAttention(
        A, H, batch_first=True, kdim=None if same_dims else DK, vdim=None if same_dims else DV
    )
    with torch.no_grad():
        w = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        if same_dims:
            mha.in_proj_weight.copy_(torch.cat(w))
        else:
            for theirs, ours in zip([mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight], w):
                theirs.copy_(ours)
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    return mha


@pytest.mark.parametrize("same_dims", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_multihead_matches_torch(same_dims, masked):
    kd, vd = (A, A) if same_dims else (DK, DV)
    attn = build_attention("multihead", A, kd, A, num_heads=H, value_dim=vd)
    assert attn.out_dim == A
    mha = _torch_mha(attn, same_dims)
    query, keys, values = torch.randn(B, T, A), torch.randn(B, R, kd), torch.randn(B, R, vd)
    mask = random_mask(B, R) if masked else None
    pad = None if mask is None else ~mask  # torch: True = ignore
    with torch.no_grad():
        got_c, got_w = attn(query, keys, values, mask=mask)
        want_c, want_w = mha(query, keys, values, key_padding_mask=pad)
        _, want_heads = mha(query, keys, values, key_padding_mask=pad, average_attn_weights=False)
        torch.testing.assert_close(got_c, want_c)
        assert got_w.shape == (B, H, T, R)
        torch.testing.assert_close(got_w, want_heads)
        torch.testing.assert_close(got_w.mean(1), want_w)
        c1, w1 = attn(query[:, 0], keys, values, mask=mask)  # one decoding step
        assert w1.shape == (B, H, R)
        torch.testing.assert_close(c1, want_c[:, 0])


@pytest.mark.parametrize("mask_dims", [0, 2, 3])
def test_multihead_sdpa_path_matches_explicit(mask_dims):
    attn = build_attention("multihead", DQ, DK, A, num_heads=H)
    query, keys = torch.randn(B, T, DQ), torch.randn(B, R, DK)
    mask = {0: None, 2: random_mask(B, R), 3: random_mask(B, T, R)}[mask_dims]
    if mask is not None:
        mask[1] = False  # fully masked rows: zero context on both paths
    want, _ = attn(query, keys, mask=mask)
    attn.need_weights = False
    got, weights = attn(query, keys, mask=mask)
    assert weights is None and not torch.isnan(got).any()
    torch.testing.assert_close(got, want)


def test_multihead_single_head_keeps_head_dim():
    attn = build_attention("multihead", DQ, DK, A, num_heads=1)
    _, w = attn(torch.randn(B, DQ), torch.randn(B, R, DK))
    assert w.shape == (B, 1, R)


def test_masked_softmax_plain():
    scores = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(scores, mask)
    torch.testing.assert_close(w[0, :2], torch.softmax(scores[0, :2], -1))
    assert (w[0, 2:] == 0).all() and (w[1] == 0).all()
    torch.testing.assert_close(w[2], torch.softmax(scores[2], -1))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown attention 'nope'.*scaled_dot"):
        build_attention("nope", DQ, DK, A)


def test_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        build_attention("multihead", DQ, DK, 10, num_heads=3)


def test_additive_scores_equal_tanh_form_with_gradients():
    from captioner.models.attention import additive_scores

    q = (torch.randn(4, 1, 64) * 3).requires_grad_()
    p = (torch.randn(4, 49, 64) * 3).requires_grad_()
    v = torch.randn(1, 64, requires_grad=True)
    got = additive_scores(q, p, v)
    want = (torch.tanh(q + p) @ v.t()).squeeze(-1)  # v^T tanh(q + p), (4, 49)
    assert got.shape == want.shape == (4, 49)
    assert torch.allclose(got, want, atol=1e-5)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, p, v), g)
    grads_ref = torch.autograd.grad(want, (q, p, v), g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_additive_scores_blocked_without_autograd_equal_unblocked():
    from captioner.models import attention

    q, p, v = torch.randn(300, 1, 32), torch.randn(300, 7, 32), torch.randn(1, 32)
    with torch.no_grad():
        whole = attention.additive_scores(q, p, v)
        old, attention._CHUNK_BYTES = attention._CHUNK_BYTES, 7 * 32 * 4 * 16  # 16-row blocks
        try:
            blocked = attention.additive_scores(q, p, v)
        finally:
            attention._CHUNK_BYTES = old
    assert torch.equal(whole, blocked)
