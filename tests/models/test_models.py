import pytest
import torch

from captioner.checkpoint import build_model
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.search import beam_search, greedy_search

V, R, C = 23, 9, 12


def decoder(**kw):
    torch.manual_seed(0)
    d = LSTMDecoder(vocab_size=V, encoder_dim=C, embed_dim=8, hidden_size=16, attention_dim=8,
                    dropout=0.0, **kw)
    return d.eval()


@pytest.mark.parametrize("attention", ["additive", "dot", "scaled_dot", "general", "bilinear", "multihead"])
def test_teacher_forcing_equals_stepping(attention):
    d = decoder(attention=attention, num_heads=2 if attention == "multihead" else 1)
    feats = torch.randn(3, R, C)
    tokens = torch.randint(0, V, (3, 7))
    logits, attn = d(feats, tokens)  # (B, T, V), (B, T, R)
    state = d.init_state(feats)
    for t in range(tokens.size(1)):
        step_logits, state, step_attn = d.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
        if step_attn.dim() == 3:
            step_attn = step_attn.mean(1)
        torch.testing.assert_close(step_attn, attn[:, t], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 7), atol=1e-5, rtol=0)


def test_captions_per_image_share_the_grid():
    d = decoder()
    feats = torch.randn(2, R, C)
    tokens = torch.randint(0, V, (6, 5))  # 3 captions per image
    logits, _ = d(feats, tokens)
    expanded, _ = d(feats.repeat_interleave(3, 0), tokens)
    torch.testing.assert_close(logits, expanded)


def test_beam_one_equals_greedy_on_lstm():
    d = decoder()
    feats = torch.randn(4, R, C)
    g, _ = greedy_search(d, feats, bos_id=1, eos_id=2, pad_id=0, max_length=12)
    b, _, _ = beam_search(d, feats, bos_id=1, eos_id=2, pad_id=0, beam_size=1, max_length=12)
    assert torch.equal(g, b[:, : g.size(1)]) and (b[:, g.size(1):] == 0).all()


def tiny_captioner(vocab_size):
    return build_model({
        "_target_": "captioner.models.captioner.Captioner", "vocab_size": vocab_size,
        "pad_id": 0, "bos_id": 1, "eos_id": 2,
        "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                    "return_layer": "layer2"},
        "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                    "embed_dim": 32, "hidden_size": 64, "attention_dim": 32, "dropout": 0.0},
    })


def test_overfits_eight_images(synthetic_root):
    """A model that cannot memorise 8 captions has a bug in its data path or its gradients."""
    from captioner.data.datamodule import CaptionDataModule

    dm = CaptionDataModule(
        splits={"train": {"annotations": str(synthetic_root / "annotations/captions_train.json"),
                          "images": str(synthetic_root / "images")}},
        image_size=32, batch_size=8, num_workers=0, captions_per_image=1,
    )
    dm.setup()
    batch = next(iter(dm.dataloader("train", train=False)))  # first caption of 8 images
    torch.manual_seed(0)
    model = tiny_captioner(len(dm.tokenizer))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = batch["captions"][:, 0]  # (8, T)
    for _ in range(150):
        logits, _ = model(batch["images"], tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    out, _ = model.generate(batch["images"], method="greedy", max_length=30)
    from captioner.data.tokenizer import decode

    ids = tokens[:, 1:].tolist()
    want = [decode(dm.tokenizer, row) for row in ids]
    got = [decode(dm.tokenizer, row) for row in out.tolist()]
    assert sum(w == g for w, g in zip(want, got)) >= 7


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_bf16_decoding_keeps_float_outputs_and_autocast_state(method):
    torch.manual_seed(0)
    model = tiny_captioner(12).eval()
    images = torch.randn(3, 3, 32, 32)
    fp32, attn32 = model.generate(images, method=method, beam_size=2, max_length=6)
    bf16, attn16 = model.generate(images, method=method, beam_size=2, max_length=6, precision="bf16")
    assert bf16.shape[0] == 3 and attn16.dtype == torch.float32
    torch.testing.assert_close(attn16.sum(-1)[bf16 != 0], torch.ones(int((bf16 != 0).sum())),
                               atol=2e-2, rtol=0)  # a distribution per generated token
    assert not torch.is_autocast_enabled("cpu")  # scoped to the call
    with pytest.raises(ValueError, match="decode.precision"):
        model.generate(images, precision="int8")
