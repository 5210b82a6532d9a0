"""Transformer decoder: causality, KV-cached stepping == teacher forcing, search, Hydra runs,
checkpoints through caption.py / evaluate.py (the latter marked slow)."""

import pytest
import torch
from PIL import Image

from captioner.checkpoint import build_model
from captioner.cli import caption as caption_cli
from captioner.cli.train import run as train_run
from captioner.models.search import beam_search, greedy_search, sample
from captioner.models.transformer_decoder import TransformerDecoder

V, R, C = 23, 9, 12
TINY_TRANSFORMER = [
    "model=transformer", "model.encoder.return_layer=layer2", "model.decoder.d_model=16",
    "model.decoder.num_layers=2", "model.decoder.num_heads=2", "model.decoder.ff_dim=32",
    "loss.alpha_c=0",
]
VARIANTS = [  # (fusion, encoder_layers, attention_layer)
    ("none", 0, -1), ("none", 1, 0), ("coattention", 0, -1), ("coattention", 1, 0),
]


def decoder(fusion="none", encoder_layers=0, attention_layer=-1, **kw):
    torch.manual_seed(0)
    d = TransformerDecoder(vocab_size=V, encoder_dim=C, d_model=16, num_layers=2, num_heads=2,
                           ff_dim=32, dropout=0.0, encoder_layers=encoder_layers, fusion=fusion,
                           attention_layer=attention_layer, **kw)
    return d.eval()


@pytest.mark.parametrize("fusion,encoder_layers,attention_layer", VARIANTS)
def test_future_tokens_do_not_leak(fusion, encoder_layers, attention_layer):
    d = decoder(fusion, encoder_layers, attention_layer)
    feats = torch.randn(2, R, C)
    tokens = torch.randint(3, V, (4, 8))  # 2 captions per image
    logits, attn = d(feats, tokens)
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1 + torch.randint(0, V - 4, (4, 3))) % (V - 3) + 3
    assert not torch.equal(changed[:, 5:], tokens[:, 5:])
    logits2, attn2 = d(feats, changed)
    torch.testing.assert_close(logits2[:, :5], logits[:, :5], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attn2[:, :5], attn[:, :5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits2[:, 5:], logits[:, 5:])  # the later ones do depend on them


@pytest.mark.parametrize("fusion,encoder_layers,attention_layer", VARIANTS)
def test_cached_steps_equal_teacher_forcing(fusion, encoder_layers, attention_layer):
    d = decoder(fusion, encoder_layers, attention_layer)
    feats = torch.randn(2, R, C)
    tokens = torch.randint(0, V, (6, 7))  # 3 captions per image share one grid
    logits, attn = d(feats, tokens)  # (6, 7, V), (6, 7, R)
    assert logits.shape == (6, 7, V) and attn.shape == (6, 7, R)
    torch.testing.assert_close(attn.sum(-1), torch.ones(6, 7), atol=1e-5, rtol=0)
    state = d.reorder_state(d.init_state(feats), torch.arange(2).repeat_interleave(3))
    for t in range(tokens.size(1)):
        step_logits, state, step_attn = d.step(tokens[:, t], state)  # (6, V), (6, H, R)
        assert state["self_k"].shape[3] == t + 1  # one cached position per step
        torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_attn.mean(1), attn[:, t], atol=1e-5, rtol=1e-5)


def test_captions_per_image_share_the_grid():
    d = decoder()
    feats = torch.randn(2, R, C)
    tokens = torch.randint(0, V, (6, 5))
    logits, attn = d(feats, tokens)
    expanded, attn_e = d(feats.repeat_interleave(3, 0), tokens)
    torch.testing.assert_close(logits, expanded, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn, attn_e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["none", "coattention"])
def test_beam_one_equals_greedy_and_search_runs(fusion):
    d = decoder(fusion)
    feats = torch.randn(4, R, C)
    g, g_attn = greedy_search(d, feats, bos_id=1, eos_id=2, pad_id=0, max_length=12)
    b, _, _ = beam_search(d, feats, bos_id=1, eos_id=2, pad_id=0, beam_size=1, max_length=12)
    assert torch.equal(g, b[:, : g.size(1)]) and (b[:, g.size(1):] == 0).all()
    assert g_attn.shape == (4, g.size(1), R)
    b3, _, scores = beam_search(d, feats, bos_id=1, eos_id=2, pad_id=0, beam_size=3, max_length=12)
    assert b3.size(0) == 4 and torch.isfinite(scores).all()
    tokens, logps, mask = sample(d, feats, bos_id=1, eos_id=2, pad_id=0, num_samples=2, max_length=6)
    assert tokens.shape[0] == 8 and logps.requires_grad == torch.is_grad_enabled()
    assert (logps[~mask] == 0).all()


def test_tied_embeddings_and_options():
    tied, untied = decoder(), decoder(tie_embeddings=False)
    assert tied.head.weight is tied.embedding.weight
    assert untied.head.weight is not untied.embedding.weight
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(tied) == V * 16
    with pytest.raises(ValueError, match="fusion"):
        decoder("gated")
    with pytest.raises(ValueError, match="max_length"):
        TransformerDecoder(V, C, d_model=16, num_heads=2, max_length=4)(
            torch.randn(1, R, C), torch.zeros(1, 5, dtype=torch.long))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    d = TransformerDecoder(V, C, d_model=16, num_layers=2, num_heads=2, ff_dim=32,
                           encoder_layers=1, fusion="coattention")
    logits, _ = d(torch.randn(2, R, C), torch.randint(1, V, (4, 6)))
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in d.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def transformer_cfg(root, out, *overrides):
    from conftest import TINY_DATA, compose_config

    return compose_config("train", [
        f"data.root={root}", *TINY_DATA, *TINY_TRANSFORMER, "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "~logger", *overrides,
    ], out)


@pytest.mark.parametrize("fusion", ["none", "coattention"])
def test_hydra_fast_dev_run(fusion, synthetic_root, tmp_path):
    metrics = train_run(transformer_cfg(synthetic_root, tmp_path, "debug=fast",
                                        f"model.decoder.fusion={fusion}"))
    assert metrics["train/loss"] > 0 and "test/cider" in metrics


@pytest.mark.parametrize("preset,decoder_cls", [("transformer", "TransformerDecoder"),
                                                ("lstm_attention", "LSTMDecoder")])
def test_experiment_presets_build(preset, decoder_cls, synthetic_root, tmp_path):
    from conftest import compose_config
    from omegaconf import OmegaConf

    cfg = compose_config("train", [f"experiment={preset}", f"data.root={synthetic_root}"], tmp_path)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(vocab_size=30, pad_id=0, bos_id=1, eos_id=2)
    model = build_model(model_cfg)
    assert type(model.decoder).__name__ == decoder_cls
    assert cfg.loss.alpha_c is None  # the decoder's own default applies
    assert model.decoder.default_alpha_c == (0.0 if preset == "transformer" else 1.0)
    feats = model.encode(torch.randn(2, 3, 64, 64))
    assert feats.shape[:2] == (2, 16)  # layer3 of 64x64 images: a 4x4 grid
    tokens, _ = model.generate(features=feats, method="beam", beam_size=2, max_length=5)
    assert tokens.shape[0] == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("transformer_run")
    cfg = transformer_cfg(synthetic_root, out, "trainer.limit_train_batches=2", "decode.beam_size=2")
    return out, train_run(cfg)


def test_caption_cli_with_transformer_checkpoint(trained, tmp_path, capsys):
    from captioner.checkpoint import load_checkpoint

    out, metrics = trained
    assert "test/cider" in metrics
    ckpt = out / "checkpoints" / "best.ckpt"
    model, _, payload = load_checkpoint(ckpt)
    assert isinstance(model.decoder, TransformerDecoder) and payload["decode"]["beam_size"] == 2
    Image.new("RGB", (50, 40), "red").save(tmp_path / "img.png")
    pic = tmp_path / "attention.png"
    code = caption_cli.main([str(tmp_path / "img.png"), "--checkpoint", str(ckpt),
                             "--attention", str(pic)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(tmp_path / "img.png") + "\t")
    assert Image.open(pic).format == "PNG"


@pytest.mark.slow  # pycocoevalcap's METEOR starts a Java process
def test_evaluate_with_transformer_checkpoint(trained, synthetic_root, tmp_path):
    from conftest import eval_config

    from captioner.cli.evaluate import run as eval_run

    out, _ = trained
    cfg = eval_config(out / "checkpoints" / "best.ckpt", synthetic_root, tmp_path,
                      "decode.beam_size=2")
    report = eval_run(cfg, tmp_path)
    assert 0.0 <= report["bleu4"] <= 1.0 and 0.0 <= report["cider"] <= 10.0


@pytest.mark.slow
def test_compile_switch_trains_and_keeps_checkpoint_keys(synthetic_root, tmp_path):
    """compile=true: the decoder's forward runs through torch.compile (inductor builds C++
    kernels, hence slow) and its checkpoint loads into an uncompiled model."""
    train_run(transformer_cfg(synthetic_root, tmp_path, "compile=true", "test=false"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    from captioner.checkpoint import load_checkpoint

    load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
