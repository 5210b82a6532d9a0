"""Ensembles: several trained decoders searched as one (mean log-probs over the step interface)."""

import pytest
import torch

from captioner.checkpoint import CheckpointError, build_model, load_checkpoints, save_checkpoint
from captioner.data.tokenizer import train_tokenizer, with_vocabulary
from captioner.models.ensemble import ConcatEncoder, EnsembleDecoder, ensemble
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.search import beam_search, greedy_search
from captioner.models.transformer_decoder import TransformerDecoder

V, R, C = 23, 9, 12
BOS, EOS, PAD = 1, 2, 0


def members():
    torch.manual_seed(0)
    lstm = LSTMDecoder(vocab_size=V, encoder_dim=C, embed_dim=8, hidden_size=16, attention_dim=8,
                       dropout=0.0)
    transformer = TransformerDecoder(vocab_size=V, encoder_dim=C, d_model=16, num_layers=2,
                                     num_heads=2, ff_dim=32, dropout=0.0)
    return lstm.eval(), transformer.eval()


def pair():
    lstm, transformer = members()
    return lstm, transformer, EnsembleDecoder([lstm, transformer], [(0, C), (0, C)]).eval()


def test_each_step_scores_the_mean_of_the_members_log_probs():
    lstm, transformer, both = pair()
    feats = torch.randn(3, R, C)
    tokens = torch.randint(3, V, (3, 6))
    states = [m.init_state(feats) for m in (lstm, transformer)] + [both.init_state(feats)]
    for t in range(tokens.size(1)):
        outs = [m.step(tokens[:, t], s) for m, s in zip((lstm, transformer), states[:2])]
        mixed, states[2], attn = both.step(tokens[:, t], states[2])
        states[:2] = [s for _, s, _ in outs]
        want = torch.stack([logits.log_softmax(-1) for logits, _, _ in outs]).mean(0)
        torch.testing.assert_close(mixed, want)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3))  # one map per word, still sums to 1


def test_teacher_forcing_equals_stepping():
    _, _, both = pair()
    feats, tokens = torch.randn(2, R, C), torch.randint(3, V, (2, 5))
    log_probs, attn = both(feats, tokens)  # (B, T, V), (B, T, R)
    state = both.init_state(feats)
    for t in range(tokens.size(1)):
        step, state, step_attn = both.step(tokens[:, t], state)
        torch.testing.assert_close(step, log_probs[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_attn, attn[:, t], atol=1e-5, rtol=1e-5)


def test_beam_one_equals_greedy_and_batched_beams_equal_one_image_at_a_time():
    _, _, both = pair()
    feats = torch.randn(4, R, C)
    kw = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_length=10)
    g, _ = greedy_search(both, feats, **kw)
    b, _, _ = beam_search(both, feats, beam_size=1, **kw)
    assert torch.equal(g, b[:, : g.size(1)]) and (b[:, g.size(1):] == PAD).all()
    # beams regroup every member's state (static entries one row per image, done images
    # dropped): a batch must decode as its images do alone
    batched, _, scores = beam_search(both, feats, beam_size=3, **kw)
    for i in range(4):
        alone, _, score = beam_search(both, feats[i : i + 1], beam_size=3, **kw)
        n = alone.size(1)
        assert torch.equal(batched[i, :n], alone[0]) and (batched[i, n:] == PAD).all()
        torch.testing.assert_close(scores[i], score[0])


def captioner(decoder: dict, seed: int, tok):
    config = with_vocabulary({
        "_target_": "captioner.models.captioner.Captioner",
        "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                    "return_layer": "layer2"},
        "decoder": {"_partial_": True, **decoder}}, tok)
    torch.manual_seed(seed)
    return build_model(config).eval(), config


LSTM = {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "embed_dim": 16,
        "hidden_size": 32, "attention_dim": 16}
TRANSFORMER = {"_target_": "captioner.models.transformer_decoder.TransformerDecoder",
               "d_model": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32}
CAPTIONS = ["a red square left of a blue circle", "a small green triangle above a big circle"]


def test_an_ensemble_of_a_model_with_itself_decodes_as_the_model():
    tok = train_tokenizer(CAPTIONS)
    model, _ = captioner(LSTM, 0, tok)
    twice = ensemble([model, model]).eval()
    assert twice.encoder is model.encoder  # one encoder, run once
    images = torch.randn(3, 3, 32, 32)
    for decode in ({"method": "greedy"}, {"method": "beam", "beam_size": 3}):
        a, attn_a, score_a = model.generate(images, max_length=8, num_return=1, **decode)
        b, attn_b, score_b = twice.generate(images, max_length=8, num_return=1, **decode)
        assert torch.equal(a, b)
        torch.testing.assert_close(score_a, score_b)
        torch.testing.assert_close(attn_a, attn_b)


def test_members_share_an_encoder_only_when_it_is_the_same():
    tok = train_tokenizer(CAPTIONS)
    lstm, _ = captioner(LSTM, 0, tok)
    transformer, _ = captioner(TRANSFORMER, 0, tok)  # same seed: the same encoder weights
    shared = ensemble([lstm, transformer])
    assert shared.encoder is lstm.encoder and shared.decoder.slices == [(0, 128), (0, 128)]
    other, _ = captioner(TRANSFORMER, 1, tok)  # another seed: another encoder
    apart = ensemble([lstm, other]).eval()
    assert isinstance(apart.encoder, ConcatEncoder) and apart.decoder.slices == [(0, 128), (128, 256)]
    images = torch.randn(2, 3, 32, 32)
    grid = apart.encode(images)  # (B, R, 256): each member reads its own encoder's grid
    torch.testing.assert_close(grid, torch.cat([lstm.encode(images), other.encode(images)], -1))
    tokens, attn = apart.generate(images, method="beam", beam_size=2, max_length=6)
    assert tokens.shape[0] == 2 and attn.shape[-1] == grid.size(1)
    # the same weights read through another config (which layer's grid) are not shared
    assert isinstance(ensemble([lstm, transformer], ["layer2", "layer3"]).encoder, ConcatEncoder)
    with pytest.raises(ValueError, match="1 encoder keys for 2 models"):
        ensemble([lstm, transformer], ["layer2"])
    # the feature cache keys a joined encoder by every member's settings, not its class alone
    members = apart.encoder.identity()["members"]
    assert [m["class"] for m in members] == [type(lstm.encoder).__name__] * 2


def save(path, model, config, tok, image_size=32):
    return save_checkpoint(path, model, config, tok, {"method": "beam", "beam_size": 2,
                                                      "max_length": 8}, image_size)


def test_checkpoints_load_as_an_ensemble_and_refuse_what_cannot_join(tmp_path):
    tok = train_tokenizer(CAPTIONS)
    a = save(tmp_path / "a.ckpt", *captioner(LSTM, 0, tok), tok)
    b = save(tmp_path / "b.ckpt", *captioner(TRANSFORMER, 0, tok), tok)
    model, tokenizer, payload = load_checkpoints([a, b])
    assert isinstance(model.decoder, EnsembleDecoder) and payload["ensemble"] == [str(a), str(b)]
    assert payload["decode"]["beam_size"] == 2 and tokenizer.get_vocab() == tok.get_vocab()
    single, _, plain = load_checkpoints(a)  # one path: the checkpoint itself
    assert not isinstance(single.decoder, EnsembleDecoder) and "ensemble" not in plain

    other_tok = train_tokenizer(CAPTIONS + ["a yellow star"])
    c = save(tmp_path / "c.ckpt", *captioner(LSTM, 0, other_tok), other_tok)
    with pytest.raises(CheckpointError, match=r"c\.ckpt: its vocabulary differs"):
        load_checkpoints([a, c])
    d = save(tmp_path / "d.ckpt", *captioner(LSTM, 0, tok), tok, image_size=64)
    with pytest.raises(CheckpointError, match=r"d\.ckpt: its input \(64 px"):
        load_checkpoints([a, d])
    with pytest.raises(CheckpointError, match="missing.ckpt"):
        load_checkpoints([a, tmp_path / "missing.ckpt"])
    # distinct encoders with different grids cannot share one input: refused at load
    _, deep_config = captioner(LSTM, 1, tok)
    deep_config["encoder"]["return_layer"] = "layer3"  # a 2x2 grid where a.ckpt's is 4x4
    e = save(tmp_path / "e.ckpt", build_model(deep_config), deep_config, tok)
    with pytest.raises(CheckpointError, match="different grids"):
        load_checkpoints([a, e])
