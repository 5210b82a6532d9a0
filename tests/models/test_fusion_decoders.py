"""The attention family and the fusion blocks inside the LSTM decoder: causality, stepping ==
teacher forcing, search, and a Hydra fast_dev_run for every choice."""

import pytest
import torch

from captioner.cli.train import run as train_run
from captioner.models.lstm_decoder import FUSIONS, LSTMDecoder
from captioner.models.search import beam_search, greedy_search

V, R, C = 23, 9, 12
ATTENTIONS = ["additive", "dot", "scaled_dot", "general", "bilinear", "multihead"]


def decoder(fusion="none", attention="additive"):
    torch.manual_seed(0)
    d = LSTMDecoder(vocab_size=V, encoder_dim=C, embed_dim=8, hidden_size=16, attention_dim=8,
                    attention=attention, num_heads=2 if attention == "multihead" else 1,
                    dropout=0.0, fusion=fusion)
    return d.eval()


@pytest.mark.parametrize("attention", ["additive", "multihead"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_steps_equal_teacher_forcing(fusion, attention):
    d = decoder(fusion, attention)
    feats = torch.randn(2, R, C)
    tokens = torch.randint(0, V, (4, 7))  # 2 captions per image
    logits, attn = d(feats, tokens)
    state = d.reorder_state(d.init_state(feats), torch.tensor([0, 0, 1, 1]))
    for t in range(tokens.size(1)):
        step_logits, state, step_attn = d.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
        step_attn = step_attn if step_attn.dim() == 2 else step_attn.mean(1)
        torch.testing.assert_close(step_attn, attn[:, t], atol=1e-5, rtol=1e-5)
        if "coattention" in fusion:  # the caption so far, one position per step
            assert state["co_text"].shape[:2] == (4, t + 1)


@pytest.mark.parametrize("fusion", ["coattention", "coattention+gated"])
def test_coattention_does_not_leak_future_tokens(fusion):
    d = decoder(fusion)
    feats = torch.randn(2, R, C)
    tokens = torch.randint(3, V, (2, 8))
    logits, attn = d(feats, tokens)
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] - 3 + 1) % (V - 3) + 3  # every later token differs
    logits2, attn2 = d(feats, changed)
    torch.testing.assert_close(logits2[:, :4], logits[:, :4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attn2[:, :4], attn[:, :4], atol=1e-6, rtol=1e-6)
    # from step 4 on the regions are refined by different words: attention moves
    assert not torch.allclose(attn2[:, 4:], attn[:, 4:])


def test_fusion_changes_the_model_and_none_is_unchanged():
    base = decoder()
    names = {n for n, _ in base.named_parameters()}
    assert not any(n.startswith(("coattention", "sentinel", "gate")) for n in names)
    gated = decoder("coattention+gated")
    extra = {n.split(".")[0] for n, _ in gated.named_parameters()} - {n.split(".")[0] for n in names}
    assert extra == {"coattention", "sentinel", "gate", "gate_out"}
    with pytest.raises(ValueError, match="fusion"):
        decoder("gated+coattention")


@pytest.mark.parametrize("fusion", ["coattention", "gated", "coattention+gated"])
def test_beam_one_equals_greedy_with_fusion(fusion):
    d = decoder(fusion, "multihead")
    feats = torch.randn(3, R, C)
    g, _ = greedy_search(d, feats, bos_id=1, eos_id=2, pad_id=0, max_length=10)
    b, _, _ = beam_search(d, feats, bos_id=1, eos_id=2, pad_id=0, beam_size=1, max_length=10)
    assert torch.equal(g, b[:, : g.size(1)]) and (b[:, g.size(1):] == 0).all()
    _, attn, scores = beam_search(d, feats, bos_id=1, eos_id=2, pad_id=0, beam_size=3,
                                   max_length=10)
    assert torch.isfinite(scores).all() and attn.shape[-1] == R


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_each_attention_runs_in_training(attention, train_cfg):
    metrics = train_run(train_cfg("debug=fast", f"model.decoder.attention={attention}",
                                  "model.decoder.num_heads=2", "decode.method=greedy"))
    assert metrics["train/loss"] > 0 and "test/cider" in metrics


@pytest.mark.parametrize("fusion", ["coattention", "gated", "coattention+gated"])
def test_each_fusion_runs_in_training(fusion, train_cfg):
    metrics = train_run(train_cfg("debug=fast", f"model.decoder.fusion={fusion}",
                                  "decode.beam_size=2"))
    assert metrics["train/loss"] > 0 and "test/cider" in metrics
