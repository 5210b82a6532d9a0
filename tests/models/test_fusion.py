import pytest
import torch

from captioner.models.fusion import CoAttention, GatedFusion, VisualSentinel

B, T, R, C, D, A = 2, 5, 4, 6, 8, 8
NAMES = ["scaled_dot", "additive", "dot", "general", "bilinear", "multihead"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _coattn(name):
    return CoAttention(C, D, attention=name, attention_dim=A, num_heads=2).eval()


@pytest.mark.parametrize("name", NAMES)
def test_coattention_is_causal(name):
    co = _coattn(name)
    regions, text = torch.randn(B, R, C), torch.randn(B, T, D)
    refined = co(regions, text)
    assert refined.shape == (B, T, R, C) and co.out_dim == C
    for t in range(T - 1):
        changed = text.clone()
        changed[:, t + 1 :] = torch.randn(B, T - t - 1, D)
        again = co(regions, changed)
        torch.testing.assert_close(again[:, : t + 1], refined[:, : t + 1])
        assert not torch.allclose(again[:, t + 1 :], refined[:, t + 1 :])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masked", [False, True])
def test_coattention_incremental_equals_full(name, masked):
    co = _coattn(name)
    regions, text = torch.randn(B, R, C), torch.randn(B, T, D)
    text_mask = torch.rand(B, T) > 0.3 if masked else None
    if masked:
        text_mask[1, :2] = False  # leading padding: steps 0-1 of image 1 see no text
    full = co(regions, text, text_mask)
    state = None
    for t in range(T):
        mask_t = None if text_mask is None else text_mask[:, t]
        step, state = co.step(regions, text[:, t], state, mask_t)
        torch.testing.assert_close(step, full[:, t])
        m = None if text_mask is None else text_mask[:, : t + 1]
        torch.testing.assert_close(co.last(regions, text[:, : t + 1], m), full[:, t])
    assert all(v.shape[:2] == (B, T) for v in state.values())  # batch-first, reorderable


def test_coattention_gradients_and_default():
    co = CoAttention(C, D)
    regions = torch.randn(B, R, C, requires_grad=True)
    text = torch.randn(B, T, D, requires_grad=True)
    co(regions, text).square().sum().backward()
    assert torch.isfinite(text.grad).all() and text.grad.abs().sum() > 0
    assert torch.isfinite(regions.grad).all()


@pytest.mark.parametrize("shape", [(B,), (B, T)])
def test_gated_fusion_shapes_and_range(shape):
    fusion = GatedFusion(D, C, A)
    sentinel = VisualSentinel(5, D)(
        torch.randn(*shape, 5), torch.randn(*shape, D), torch.randn(*shape, D)
    )
    assert sentinel.shape == (*shape, D) and (sentinel.abs() < 1).all()
    h, c = torch.randn(*shape, D), torch.randn(*shape, C)
    fused, beta = fusion(h, c, sentinel)
    assert fused.shape == (*shape, C) and beta.shape == shape and fusion.out_dim == C
    assert ((beta >= 0) & (beta <= 1)).all()
    s = fusion.sentinel_proj(sentinel)
    torch.testing.assert_close(fused, beta[..., None] * s + (1 - beta[..., None]) * c)


@pytest.mark.parametrize("dims", [(D, C), (D, D)])
def test_gated_fusion_limits(dims):
    d, c_dim = dims
    fusion = GatedFusion(d, c_dim, A)
    h, c = torch.randn(B, T, d), torch.randn(B, T, c_dim)
    sentinel = torch.rand(B, T, d) + 0.5  # positive, so W_s s' below is large and positive
    with torch.no_grad():
        fusion.context_score.weight.zero_()
        fusion.hidden_score.weight.zero_()
        fusion.hidden_score.bias.zero_()
        fusion.w.weight.fill_(50.0)
        if isinstance(fusion.sentinel_proj, torch.nn.Linear):
            fusion.sentinel_proj.weight.fill_(1.0)
            fusion.sentinel_proj.bias.zero_()
        fusion.sentinel_score.weight.fill_(10.0)
        fused, beta = fusion(h, c, sentinel)
        assert (beta == 1).all()  # beta = 1: all sentinel (language) path
        torch.testing.assert_close(fused, fusion.sentinel_proj(sentinel))
        fusion.sentinel_score.weight.fill_(-10.0)
        fused, beta = fusion(h, c, sentinel)
        assert (beta == 0).all()  # beta = 0: all visual path
        torch.testing.assert_close(fused, c)
