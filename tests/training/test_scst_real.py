"""Self-critical training raises the CIDEr-D reward on real captions (a small Flickr8k subset).

A tiny LSTM-attention captioner is first fitted with cross-entropy on 12 real photos (frozen
ImageNet EfficientNet-Lite0 features), then trained with the self-critical loss and the
leave-one-out mean baseline of the Flickr8k preset. The greedy captions' mean CIDEr-D against the
photos' own references must rise, and so must the samples' reward."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from captioner.data.images import build_transform, load_image
from captioner.data.tokenizer import encode, train_tokenizer
from captioner.models.captioner import Captioner
from captioner.models.encoder import EfficientNetLiteEncoder
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.training.scst import CiderReward, rewards_and_baseline, self_critical_loss
from tests.conftest import SHARED

FLICKR8K = SHARED / "data" / "flickr8k"


class CachedFeatures(torch.nn.Identity):
    out_dim = 1280  # the features are computed once above, as the feature cache does


def rewards(model, features, ids, reward, tokenizer) -> tuple[float, float]:
    """Mean CIDEr-D of the greedy captions and of 5 samples per photo (fixed seed)."""
    model.eval()
    with torch.no_grad():
        tokens, _ = model.generate(features=features, method="greedy", max_length=16)
        torch.manual_seed(1)
        samples, _, _ = model.sample(features=features, num_samples=5, max_length=16)
    greedy = [tokenizer.decode(r, skip_special_tokens=True) for r in tokens.tolist()]
    sampled = [tokenizer.decode(r, skip_special_tokens=True) for r in samples.tolist()]
    return (float(reward(greedy, ids).mean()),
            float(reward(sampled, [i for i in ids for _ in range(5)]).mean()))


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/data/flickr8k absent")
def test_self_critical_training_raises_the_reward_on_real_captions():
    torch.manual_seed(0)
    doc = json.loads((FLICKR8K / "annotations" / "captions_train.json").read_text())
    images = sorted(doc["images"], key=lambda i: i["id"])[:12]
    ids = [i["id"] for i in images]
    refs = {i: [] for i in ids}
    for a in doc["annotations"]:
        if a["image_id"] in refs:
            refs[a["image_id"]].append(a["caption"])
    transform = build_transform(128)
    pixels = torch.stack([transform(load_image(FLICKR8K / "images" / i["file_name"])) for i in images])
    with torch.no_grad():
        features = EfficientNetLiteEncoder().eval()(pixels)  # (12, 16, 1280)

    tokenizer = train_tokenizer([c for cs in refs.values() for c in cs], min_frequency=2)
    captions = [encode(tokenizer, refs[i], 16) for i in ids]
    T = max(len(c) for cs in captions for c in cs)
    tokens = torch.tensor([c + [tokenizer.pad_token_id] * (T - len(c)) for cs in captions for c in cs])
    model = Captioner(
        CachedFeatures(), partial(LSTMDecoder, embed_dim=32, hidden_size=64, attention_dim=32,
                                  dropout=0.0),
        len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
        unk_id=tokenizer.unk_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # cross-entropy: every caption of every photo, teacher forced
        model.train()
        logits, _ = model(None, tokens[:, :-1], features=features)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                                 ignore_index=tokenizer.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()

    reward = CiderReward(refs)
    greedy_before, sampled_before = rewards(model, features, ids, reward, tokenizer)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):  # self-critical, mean baseline, as experiment=flickr8k_scst
        model.train()
        samples, logprobs, mask = model.sample(features=features, num_samples=5, max_length=16)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in samples.tolist()]
        r, b = rewards_and_baseline(reward, texts, ids, 5, "mean")
        loss = self_critical_loss(logprobs, mask, r, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    greedy_after, sampled_after = rewards(model, features, ids, reward, tokenizer)
    assert sampled_after > 1.2 * sampled_before, (sampled_before, sampled_after)
    assert greedy_after > greedy_before, (greedy_before, greedy_after)
