"""The ids the search bans come from the tokenizer, are stored with the model config, and are
filled in for checkpoints saved before the bans existed."""

import torch

from captioner.checkpoint import build_model, load_checkpoint, save_checkpoint
from captioner.data.tokenizer import BAD_ENDINGS, UNK, train_tokenizer, with_vocabulary

CONFIG = {
    "_target_": "captioner.models.captioner.Captioner",
    "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                "return_layer": "layer2"},
    "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                "embed_dim": 16, "hidden_size": 32, "attention_dim": 16}}


def test_with_vocabulary_names_unk_and_the_bad_endings_present():
    tok = train_tokenizer(["a dog runs in the park with a ball", "two dogs play"])
    config = with_vocabulary(CONFIG, tok)
    vocab = tok.get_vocab()
    assert config["unk_id"] == vocab[UNK]
    words = {w for w, i in vocab.items() if i in config["bad_ending_ids"]}
    assert words == {"a", "in", "the", "with"} and words <= set(BAD_ENDINGS)


def test_old_checkpoint_without_ban_ids_gets_them_from_its_tokenizer(tmp_path):
    tok = train_tokenizer(["a red square on a table", "a blue circle"])
    new = with_vocabulary(CONFIG, tok)
    old = {k: v for k, v in new.items() if k not in ("unk_id", "bad_ending_ids")}
    model = build_model(old)
    assert model.unk_id is None and model.bad_ending_ids == []  # what the old config builds
    path = tmp_path / "old.ckpt"
    save_checkpoint(path, model, old, tok, {"method": "greedy", "max_length": 5}, 32)
    loaded, _, _ = load_checkpoint(path)
    assert loaded.unk_id == new["unk_id"] and loaded.bad_ending_ids == new["bad_ending_ids"]
    tokens, _ = loaded.generate(torch.rand(2, 3, 32, 32), method="beam", beam_size=2, max_length=6)
    assert not (tokens == new["unk_id"]).any()
