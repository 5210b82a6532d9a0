"""Cached frozen-encoder features: equal to a forward pass, keyed so any change invalidates,
written atomically, served by the data module and used by training."""

import copy
import json

import numpy as np
import pytest
import torch

import captioner.data.feature_cache as cache_mod
from captioner.data.datamodule import CaptionDataModule
from captioner.data.feature_cache import cached_features
from captioner.data.images import build_transform, load_image
from captioner.models.encoder import CNNEncoder, EfficientNetLiteEncoder


def frozen_encoder():
    torch.manual_seed(0)
    return CNNEncoder("resnet18", trainable=False, return_layer="layer2")  # (B, 16, 128) at 32 px


def image_paths(root, n):
    return [str(p) for p in sorted((root / "images" / "train").glob("*.png"))[:n]]


def datamodule(root, cache_dir, **kw):
    splits = {s: {"annotations": str(root / "annotations" / f"captions_{s}.json"),
                  "images": str(root / "images")} for s in ("train", "val", "test")}
    dm = CaptionDataModule(splits, image_size=32, batch_size=4, eval_batch_size=4, num_workers=0,
                           cache_features=True, cache_dir=str(cache_dir), **kw)
    dm.setup()
    return dm


def test_cached_features_equal_a_forward_pass(synthetic_root, tmp_path):
    enc = frozen_encoder()
    dm = datamodule(synthetic_root, tmp_path)
    dm.set_encoder(enc)
    batch = next(iter(dm.val_dataloader()))
    assert "images" not in batch and batch["features"].shape == (4, 16, 128)  # (B, R, C)
    paths = dm.table("val")["path"][:4]
    images = torch.stack([build_transform(32)(load_image(p)) for p in paths])
    with torch.no_grad():
        direct = enc.eval()(images)
    torch.testing.assert_close(batch["features"], direct, rtol=1e-5, atol=1e-5)
    assert batch["captions"].shape[:2] == (4, 5)


def test_any_change_gives_a_new_entry_and_same_settings_reuse(synthetic_root, tmp_path, monkeypatch):
    enc, t32 = frozen_encoder(), build_transform(32)
    paths = image_paths(synthetic_root, 6)
    first = cached_features(enc, paths, t32, tmp_path, name="x")
    calls = []
    monkeypatch.setattr(cache_mod, "_extract", lambda *a, **k: calls.append(1) or 1 / 0)
    assert cached_features(enc, paths, t32, tmp_path, name="x").folder == first.folder  # reused
    monkeypatch.undo()
    folders = {first.folder}
    folders.add(cached_features(enc, paths, build_transform(40), tmp_path, name="x").folder)
    folders.add(cached_features(enc, paths[:5], t32, tmp_path, name="x").folder)
    folders.add(cached_features(enc, paths, t32, tmp_path, name="x", dtype="float16").folder)
    with torch.no_grad():
        enc.blocks[-1][0].conv1.weight.mul_(2)  # other weights, same name
    folders.add(cached_features(enc, paths, t32, tmp_path, name="x").folder)
    assert len(folders) == 5 and not calls


def test_float16_cache_is_close_to_float32(synthetic_root, tmp_path):
    enc, t32 = frozen_encoder(), build_transform(32)
    paths = image_paths(synthetic_root, 4)
    full = cached_features(enc, paths, t32, tmp_path)
    half = cached_features(enc, paths, t32, tmp_path, dtype="float16")
    assert half.features.dtype == np.float16 and full.features.dtype == np.float32
    torch.testing.assert_close(half[1], full[1], rtol=2e-3, atol=2e-3)


def test_interrupted_extraction_leaves_no_entry(synthetic_root, tmp_path):
    enc, t32 = frozen_encoder(), build_transform(32)
    paths = image_paths(synthetic_root, 8)
    real_forward, seen = enc.forward, []

    def dies_on_second_batch(x):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real_forward(x)

    enc.forward = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        cached_features(enc, paths, t32, tmp_path, batch_size=4)
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary folder
    enc.forward = real_forward
    entry = cached_features(enc, paths, t32, tmp_path, batch_size=4)
    assert len(entry) == 8 and entry.valid.all()


def test_unreadable_image_is_skipped_or_named(synthetic_root, tmp_path):
    enc, t32 = frozen_encoder(), build_transform(32)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [*image_paths(synthetic_root, 1), str(bad)]
    with pytest.raises(Exception, match="bad.png"):
        cached_features(enc, paths, t32, tmp_path / "c")
    entry = cached_features(enc, paths, t32, tmp_path / "c", skip_bad_images=True)
    assert entry.valid.tolist() == [True, False]


def test_trainable_encoder_is_refused(synthetic_root, tmp_path):
    dm = datamodule(synthetic_root, tmp_path)
    dm.set_encoder(CNNEncoder("resnet18", trainable=True, return_layer="layer2"))
    with pytest.raises(ValueError, match="model.encoder.trainable=false"):  # every block trains
        dm.train_dataloader()
    # evaluating a fine-tuned checkpoint: nothing trains the encoder, so its features cache
    dm.set_encoder(CNNEncoder("resnet18", trainable=True, return_layer="layer2"), inference=True)
    assert next(iter(dm.dataloader("val")))["features"].dim() == 3  # (B, R, C)
    with pytest.raises(ValueError, match="augment"):
        datamodule(synthetic_root, tmp_path, augment=True)


def test_training_from_cached_features(train_cfg, tmp_path):
    from captioner.cli.train import run

    cache = tmp_path / "cache"
    metrics = run(train_cfg(
        "model/encoder=efficientnet_lite0", "model.encoder.pretrained=false",
        "model.encoder.return_layer=3", "++data.cache_features=true", f"++data.cache_dir={cache}",
        "trainer.fast_dev_run=true",
    ))
    assert np.isfinite(metrics["train/loss"])
    entries = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert entries == ["test", "train", "val"]
    # fine-tuning the last 2 blocks: the frozen trunk's maps are cached, the step runs the rest
    metrics = run(train_cfg(
        "model/encoder=efficientnet_lite0", "model.encoder.pretrained=false",
        "model.encoder.return_layer=3", "model.encoder.trainable=true",
        "model.encoder.trainable_layers=2", "++data.cache_features=true",
        f"++data.cache_dir={cache}", "trainer.fast_dev_run=true",
    ))
    assert np.isfinite(metrics["train/loss"])
    trunks = [json.loads((p / "meta.json").read_text())["encoder"].get("trunk_blocks")
              for p in cache.iterdir()]
    assert sorted(trunks, key=str) == [3, 3, 3, None, None, None]


def test_efficientnet_features_cache_keyed_by_weights(synthetic_root, tmp_path):
    t32 = build_transform(32)
    paths = image_paths(synthetic_root, 2)
    torch.manual_seed(0)
    a = cached_features(EfficientNetLiteEncoder(pretrained=False, return_layer=3), paths, t32, tmp_path)
    b = cached_features(EfficientNetLiteEncoder(pretrained=True, return_layer=3), paths, t32, tmp_path)
    assert a.folder != b.folder and a.meta["encoder"]["weights"] is None


def test_batched_fetch_equals_item_by_item_and_uses_no_workers(synthetic_root, tmp_path):
    from captioner.data.datamodule import CachedFeatureDataset

    dm = datamodule(synthetic_root, tmp_path, cache_dtype="float16")
    dm.num_workers = 2  # the image path's workers; cached loaders need none
    dm.set_encoder(frozen_encoder())
    loader = dm.val_dataloader()
    assert loader.num_workers == 0
    ds = loader.dataset
    assert isinstance(ds, CachedFeatureDataset)
    idx = [5, 0, 3, 3, 1]  # unordered, repeated
    cache = ds.cache
    cache._valid = cache.valid.copy()
    cache._valid[3] = False  # as if image 3 were unreadable
    batched = ds.__getitems__(idx)
    single = [ds[i] for i in idx]
    assert [b is None for b in batched] == [False, False, True, True, False]
    for b, s in zip(batched, single):
        if b is not None:
            assert b["features"].dtype == torch.float32
            torch.testing.assert_close(b["features"], s["features"], rtol=0, atol=0)
            assert b["captions"] == s["captions"] and b["image_id"] == s["image_id"]


def test_fine_tuning_caches_the_frozen_trunk_and_trains_the_rest(synthetic_root, tmp_path):
    """trainable_layers=N with cache_features: the frozen blocks' maps are cached, the last N
    blocks run in the step (and get gradients), and the features equal a full forward pass."""
    torch.manual_seed(0)
    enc = EfficientNetLiteEncoder(pretrained=False, return_layer=3, trainable=True,
                                  trainable_layers=2)  # stem + 4 MBConv: the last 2 train
    assert enc.trunk_blocks == 3
    dm = datamodule(synthetic_root, tmp_path)
    dm.set_encoder(enc)
    batch = next(iter(dm.val_dataloader()))
    assert "features" not in batch and batch["trunk"].dim() == 4  # (B, C', h, w)
    paths = dm.table("val")["path"][:4]
    images = torch.stack([build_transform(32)(load_image(p)) for p in paths])
    enc.eval()
    with torch.no_grad():
        direct = enc(images)  # (B, R, C)
    torch.testing.assert_close(enc.from_trunk(batch["trunk"]), direct, rtol=1e-4, atol=1e-4)
    # the trainable blocks learn from the cached maps; the trunk never runs again
    ran = []
    hooks = [b.register_forward_hook(lambda *_: ran.append(1)) for b in enc.blocks[:3]]
    enc.train()
    enc.from_trunk(batch["trunk"]).sum().backward()
    assert all(p.grad is not None for p in enc.blocks[3:].parameters()) and not ran
    for h in hooks:
        h.remove()
    # a copy of the trunk (what extraction runs) takes its blocks and input buffers, not the encoder
    trunk_copy = copy.deepcopy(enc.frozen_trunk())
    assert sum(p.numel() for p in trunk_copy.parameters()) == sum(
        p.numel() for p in enc.blocks[:3].parameters())
    torch.testing.assert_close(trunk_copy(images), enc.frozen_trunk()(images))
    # its entry is keyed apart from the whole frozen encoder's, and survives the head changing
    trunk_entry = dm.features("val").folder
    with torch.no_grad():
        enc.blocks[-1].block._project_conv.weight.mul_(2)
    assert dm.features("val").folder == trunk_entry
    frozen = EfficientNetLiteEncoder(pretrained=False, return_layer=3)
    frozen.load_state_dict(enc.state_dict())
    dm.set_encoder(frozen)
    assert dm.features("val").folder != trunk_entry
    # the trunk stays in eval mode (its BatchNorm statistics untouched) while the encoder trains
    trunk = enc.frozen_trunk()
    trunk.train()
    assert not any(m.training for m in trunk.modules())
    # every block trainable: nothing frozen to cache; none trainable: the whole encoder is cached
    dm.set_encoder(EfficientNetLiteEncoder(pretrained=False, return_layer=3, trainable=True))
    with pytest.raises(ValueError, match="trainable_layers"):
        dm.train_dataloader()
    dm.set_encoder(EfficientNetLiteEncoder(pretrained=False, return_layer=3, trainable=True,
                                           trainable_layers=0))
    assert next(iter(dm.train_dataloader()))["features"].dim() == 3  # (B, R, C)


def test_captioning_a_loader_of_trunk_maps_equals_captioning_its_images(synthetic_root, tmp_path):
    from captioner.checkpoint import build_model
    from captioner.data.tokenizer import with_vocabulary
    from captioner.inference import caption_loader

    dm = datamodule(synthetic_root, tmp_path)
    tok = dm.tokenizer
    config = with_vocabulary({
        "_target_": "captioner.models.captioner.Captioner",
        "encoder": {"_target_": "captioner.models.encoder.EfficientNetLiteEncoder",
                    "pretrained": False, "return_layer": 3, "trainable": True,
                    "trainable_layers": 2},
        "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                    "embed_dim": 8, "hidden_size": 16, "attention_dim": 8}}, tok)
    torch.manual_seed(0)
    model = build_model(config).eval()
    dm.set_encoder(model.encoder)
    decode = {"method": "greedy", "max_length": 5}
    from_trunk = caption_loader(model, tok, dm.val_dataloader(), decode, progress=False)
    dm.cache_features = False
    from_images = caption_loader(model, tok, dm.val_dataloader(), decode, progress=False)
    assert from_trunk == from_images and len(from_trunk) == len(dm.table("val"))
