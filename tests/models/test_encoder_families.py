"""The encoder families (Hugging Face CLIP / SigLIP / DINOv2 / ViT, timm, open_clip, torchvision
ViT / Swin / ConvNeXt): tiny randomly initialised models saved to a folder and loaded back from
it as real weights are, each trained one step through the project's training loop, its features
cached, its checkpoint captioning an image after the original files are gone; preprocessing from
the model; fine-tuning by unit; offline errors in one line; the allowlist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from captioner.models.encoders import (
    CNNEncoder,
    EncoderWeightsError,
    HFEncoder,
    OpenCLIPEncoder,
    TimmEncoder,
    TorchvisionViTEncoder,
)
from tests.conftest import TINY_DATA, compose_config

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             image_size=32, patch_size=8)  # 4x4 = 16 patches of 32 channels at 32 px


def save_hf(folder: Path, kind: str) -> Path:
    """A tiny random model and its image processor, written as ``save_pretrained`` does."""
    import transformers as T

    if kind == "clip":
        T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)).save_pretrained(folder)
        T.CLIPImageProcessor(size={"shortest_edge": 32},
                             crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "siglip":
        T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)).save_pretrained(folder)
        T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "dinov2":
        T.Dinov2Model(T.Dinov2Config(**SMALL)).save_pretrained(folder)
        T.BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                            do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                            image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    elif kind == "vit":
        T.ViTModel(T.ViTConfig(**SMALL)).save_pretrained(folder)
        T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


OPEN_CLIP_TINY = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                 "head_width": 16},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2,
                               "layers": 1}}


def save_open_clip(folder: Path) -> tuple[Path, Path]:
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(config)
    weights = folder / "tiny-clip.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), weights)
    return config, weights


def save_timm(folder: Path) -> Path:
    import timm

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test_vit.pth"  # timm's tiny test ViT: 160 px, 10x10 patches of 64
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), path)
    return path


# ---- one training step, cached features, checkpoint, caption: per family -------------------
def family_overrides(kind: str, folder: Path) -> list[str]:
    if kind in ("clip", "siglip", "dinov2", "vit"):
        return ["model/encoder=hf", f"model.encoder.path={save_hf(folder, kind)}"]
    if kind == "open_clip":
        config, weights = save_open_clip(folder)
        return ["model/encoder=open_clip", "model.encoder.name=tiny-clip",
                f"model.encoder.config={config}", f"model.encoder.pretrained={weights}"]
    if kind == "timm":
        return ["model/encoder=timm", "model.encoder.name=test_vit", "model.encoder.pretrained=false",
                f"model.encoder.checkpoint={save_timm(folder)}"]
    raise ValueError(kind)


DECODERS = {"lstm_attention": ["model.decoder.embed_dim=16", "model.decoder.hidden_size=32",
                                "model.decoder.attention_dim=16"],
            "transformer": ["model.decoder.d_model=16", "model.decoder.num_layers=1",
                            "model.decoder.num_heads=2", "model.decoder.ff_dim=32"]}
FAMILIES = [("clip", "lstm_attention"), ("siglip", "transformer"), ("dinov2", "lstm_attention"),
            ("vit", "transformer"), ("timm", "transformer"), ("open_clip", "lstm_attention")]


@pytest.mark.parametrize("kind, decoder", FAMILIES, ids=[k for k, _ in FAMILIES])
def test_family_trains_caches_checkpoints_and_captions(kind, decoder, tmp_path, synthetic_root,
                                                       capsys):
    from captioner.checkpoint import load_checkpoint
    from captioner.cli import caption as caption_cli
    from captioner.cli.train import run
    from captioner.data.images import checkpoint_transform, load_image

    folder, cache, out = tmp_path / "weights", tmp_path / "cache", tmp_path / "run"
    cfg = compose_config("train", [
        f"data.root={synthetic_root}", *TINY_DATA, f"model={decoder}",
        *family_overrides(kind, folder), *DECODERS[decoder], "trainer.accelerator=cpu",
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "test=false", "~logger", "threads=1", "++data.cache_features=true",
        f"++data.cache_dir={cache}", "val_decode.max_length=4",
    ], out)
    metrics = run(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "val"]

    ckpt = out / "checkpoints" / "last.ckpt"
    model, _, payload = load_checkpoint(ckpt)
    encoder = model.encoder
    pre = payload["preprocess"]
    assert pre == {**encoder.preprocess, "any_size": False}  # the model's own, stored
    if kind == "clip":  # CLIP's statistics, not ImageNet's, and its resize + centre crop
        assert pre["mean"][0] == pytest.approx(0.48145466) and pre["resize"] == "shorter"
    # cached features equal the checkpoint's encoder on the stored transform
    entry = next(p for p in cache.iterdir() if p.name.startswith("val"))
    meta = json.loads((entry / "meta.json").read_text())
    feats = torch.from_numpy(__import__("numpy").load(entry / "features.npy"))
    image = sorted((synthetic_root / "images" / "val").glob("*.png"))[0]
    with torch.no_grad():
        direct = encoder(checkpoint_transform(payload)(load_image(image))[None])  # (1, R, C)
    assert feats.shape[1:] == direct.shape[1:] and meta["encoder"]["class"] == type(encoder).__name__
    torch.testing.assert_close(feats[0], direct[0], rtol=1e-4, atol=1e-4)

    shutil.rmtree(folder)  # the checkpoint alone captions: no weight files, no model folder
    assert caption_cli.main([str(image), "--checkpoint", str(ckpt), "--max-length", "5"]) == 0
    assert str(image) in capsys.readouterr().out


# ---- shapes of the real torchvision architectures (random weights) ---------------------------
@pytest.mark.parametrize("make, size, shape", [
    (lambda: CNNEncoder("swin_t", trainable=False), 64, (1, 4, 768)),  # stride 32
    (lambda: CNNEncoder("convnext_tiny", trainable=False), 64, (1, 4, 768)),
    (lambda: TorchvisionViTEncoder("vit_b_16"), 224, (1, 196, 768)),  # 14x14 patches
    (lambda: TorchvisionViTEncoder("vit_b_16", class_token="keep"), 224, (1, 197, 768)),
], ids=["swin_t", "convnext_tiny", "vit_b_16", "vit_b_16-keep"])
def test_torchvision_vit_swin_convnext_features(make, size, shape):
    enc = make().eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, size, size)).shape == shape
    assert enc.out_dim == shape[2]
    pre = enc.preprocess
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])  # torchvision's for the weights
    if isinstance(enc, TorchvisionViTEncoder):
        assert pre["size"] == [224, 224] and pre["resize"] == "shorter" and not pre["any_size"]


# ---- preprocessing comes from the model --------------------------------------------------------
def test_preprocessing_is_what_each_library_declares(tmp_path):
    clip = HFEncoder(str(save_hf(tmp_path / "clip", "clip"))).preprocess
    assert clip["interpolation"] == "bicubic" and clip["std"][0] == pytest.approx(0.26862954)
    siglip = HFEncoder(str(save_hf(tmp_path / "siglip", "siglip"))).preprocess
    assert siglip["mean"] == [0.5] * 3 and siglip["resize"] == "squash"
    dino = HFEncoder(str(save_hf(tmp_path / "dino", "dinov2"))).preprocess
    assert dino["resize_size"] == 36 and dino["size"] == [32, 32]  # shorter side, centre crop
    timm_pre = TimmEncoder("test_vit").preprocess  # timm's resolve_data_config: crop_pct 0.95
    assert timm_pre["size"] == [160, 160] and timm_pre["resize_size"] == 168
    config, weights = save_open_clip(tmp_path / "oc")
    oc = OpenCLIPEncoder("tiny-clip", config=str(config), pretrained=str(weights)).preprocess
    assert oc["size"] == [32, 32] and oc["mean"][0] == pytest.approx(0.48145466)


def test_the_transform_follows_the_declared_preprocessing():
    from PIL import Image

    from captioner.data.images import build_transform
    from captioner.models.encoders import make_preprocess

    pre = make_preprocess(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", "shorter", 8)
    img = Image.new("RGB", (16, 8), (255, 0, 128))  # wide: shorter side 8 -> (8, 16) -> crop 4
    x = build_transform(None, preprocess=pre)(img)
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]))


def test_legacy_transform_and_cnn_cache_keys_are_unchanged():
    """CNNs and EfficientNet-Lite declare what the project always fed them: the transform (and
    so every feature-cache key) at a given data.image_size is exactly the old one."""
    from captioner.data.images import build_transform
    from captioner.models.encoders import EfficientNetLiteEncoder

    old = repr(build_transform(32))
    for enc in (CNNEncoder("resnet18", return_layer="layer2"),
                EfficientNetLiteEncoder(pretrained=False, return_layer=3)):
        assert repr(build_transform(32, preprocess=enc.preprocess)) == old


def test_lite_features_unchanged_by_its_declared_preprocessing():
    """Lite keeps its in-model re-normalisation: ImageNet-normalised input -> [-1, 1], so its
    features (and old checkpoints) are the same as before preprocessing was declared."""
    from PIL import Image

    from captioner.data.images import build_transform
    from captioner.models.encoders import EfficientNetLiteEncoder

    torch.manual_seed(0)
    enc = EfficientNetLiteEncoder(pretrained=False, return_layer=3).eval()
    img = Image.new("RGB", (40, 40), (10, 200, 90))
    x = build_transform(32, preprocess=enc.preprocess)(img)[None]
    raw = build_transform(32, preprocess={**enc.preprocess, "mean": [0.0] * 3, "std": [1.0] * 3})(img)[None]
    torch.testing.assert_close(enc.normalise(x), (raw * 255 - 127) / 128, rtol=1e-5, atol=1e-5)


# ---- fine-tuning by unit ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hf", "timm", "open_clip", "torchvision_vit"])
def test_trainable_layers_unfreeze_the_last_blocks_only(kind, tmp_path):
    if kind == "hf":
        enc, x = HFEncoder(str(save_hf(tmp_path, "dinov2")), trainable=True, trainable_layers=1), 32
        last, first = "encoder.layer.1.", "embeddings."
    elif kind == "timm":
        enc, x = TimmEncoder("test_vit", trainable=True, trainable_layers=1), 160
        last, first = f"blocks.{len(TimmEncoder('test_vit').model.blocks) - 1}.", "patch_embed."
    elif kind == "open_clip":
        config, weights = save_open_clip(tmp_path)
        enc = OpenCLIPEncoder("tiny-clip", config=str(config), pretrained=str(weights),
                              trainable=True, trainable_layers=1)
        x, last, first = 32, "transformer.resblocks.1.", "conv1."
    else:
        enc, x = TorchvisionViTEncoder("vit_b_16", trainable=True, trainable_layers=1), 224
        last, first = "encoder.layers.encoder_layer_11.", "conv_proj."
    grads = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith(last) or "norm" in n or n.startswith("ln_post")
                         or n.startswith("encoder.ln") for n in grads), sorted(grads)[:5]
    assert not any(n.startswith(first) for n in grads)
    enc.train()(torch.randn(1, 3, x, x)).sum().backward()
    assert all(p.grad is not None for n, p in enc.model.named_parameters() if n in grads)
    assert len(enc.tunable_parameters()) == len(grads)
    frozen = TimmEncoder("test_vit") if kind == "timm" else None
    if frozen is not None:
        assert not any(p.requires_grad for p in frozen.parameters()) and frozen.tunable_parameters() == []


def test_class_token_keep_needs_one(tmp_path):
    with pytest.raises(ValueError, match="no class token"):
        HFEncoder(str(save_hf(tmp_path, "siglip")), class_token="keep")
    with pytest.raises(ValueError, match="class_token"):
        TimmEncoder("test_vit", class_token="first")


# ---- offline: one line naming the model and where the file belongs -------------------------------
def one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_weights_are_one_line_naming_model_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(EncoderWeightsError) as e:
        HFEncoder("openai/clip-vit-base-patch16")
    assert "openai/clip-vit-base-patch16" in one_line(e) and "huggingface-cli download" in str(e.value)
    with pytest.raises(EncoderWeightsError) as e:
        HFEncoder(str(tmp_path / "no-such-folder"))
    assert "no-such-folder" in one_line(e)
    with pytest.raises(EncoderWeightsError) as e:
        TimmEncoder("vit_tiny_patch16_224", pretrained=True)
    assert "vit_tiny_patch16_224" in one_line(e) and "pretrained=True" in str(e.value)
    with pytest.raises(EncoderWeightsError) as e:
        TimmEncoder("test_vit", checkpoint=str(tmp_path / "missing.pth"))
    assert "missing.pth" in one_line(e)
    with pytest.raises(EncoderWeightsError) as e:
        OpenCLIPEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert "ViT-B-32" in one_line(e) and "laion2b_s34b_b79k" in str(e.value)
    with pytest.raises(EncoderWeightsError) as e:
        TorchvisionViTEncoder("vit_b_16", weights="IMAGENET1K_V1")
    assert "vit_b_16" in one_line(e) and "torch" in str(e.value)


def test_train_cli_prints_a_missing_weight_file_as_one_line(train_cfg, tmp_path, monkeypatch, capsys):
    from captioner.utils.hydra import exit_on_bad_input

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from captioner.cli.train import run

    cfg = compose_config("train", ["model/encoder=hf", f"model.encoder.path={tmp_path / 'nope'}"],
                         tmp_path)
    with pytest.raises(SystemExit) as e, exit_on_bad_input(None):
        run(cfg)
    assert e.value.code == 2
    # (Lightning's "Seed set to 42" may come first, depending on which test configured logging)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: Hugging Face model")


# ---- the allowlist ---------------------------------------------------------------------------------
def test_allowlist_builds_the_families_and_refuses_anything_else():
    from captioner.models.build import ENCODERS, ModelConfigError, check_model_config

    for target in ("captioner.models.encoders.timm.TimmEncoder",
                   "captioner.models.encoders.huggingface.HFEncoder",
                   "captioner.models.encoders.open_clip.OpenCLIPEncoder",
                   "captioner.models.encoders.torchvision.TorchvisionViTEncoder",
                   "captioner.models.encoders.torchvision.CNNEncoder",
                   "captioner.models.encoder.CNNEncoder",  # configs and checkpoints before the split
                   "captioner.models.encoder.EfficientNetLiteEncoder"):
        assert target in ENCODERS
    base = {"_target_": "captioner.models.captioner.Captioner", "vocab_size": 10, "pad_id": 0,
            "bos_id": 1, "eos_id": 2,
            "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True}}
    check_model_config({**base, "encoder": {"_target_": "captioner.models.encoders.timm.TimmEncoder",
                                            "name": "test_vit"}})
    for target in ("timm.create_model", "captioner.models.encoders.timm.lazy_import",
                   "captioner.models.encoders.huggingface.transformers.AutoModel.from_pretrained",
                   "captioner.models.encoders.base.TokenEncoder", "os.system"):
        with pytest.raises(ModelConfigError, match="is not one of"):
            check_model_config({**base, "encoder": {"_target_": target, "name": "x"}})
    with pytest.raises(ModelConfigError, match="no argument"):
        check_model_config({**base, "encoder": {"_target_": "captioner.models.encoders.timm.TimmEncoder",
                                                "name": "x", "pretrained_cfg_overlay": "y"}})


# ---- open_clip towers that are not its own ViT: timm trunks (SigLIP, EVA, ConvNeXt) and RN ---
OPEN_CLIP_TOWERS = {
    "modified_resnet": ({"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                        "ModifiedResNet", "layer4.0.", "conv1."),
    "timm_vit": ({"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                  "timm_pool": "token", "timm_proj": "linear"}, "TimmModel", "trunk.blocks.", "trunk.patch_embed."),
    "timm_convnext": ({"image_size": 64, "timm_model_name": "test_convnext",
                       "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"},
                      "TimmModel", "trunk.stages.3.", "trunk.stem."),
}


@pytest.mark.parametrize("tower", list(OPEN_CLIP_TOWERS))
def test_open_clip_towers_beyond_its_vit_give_features_and_fine_tune(tower, tmp_path):
    """A SigLIP / EVA / ConvNeXt model of open_clip is a timm trunk, OpenAI's RN50 a
    ModifiedResNet: each gives region features before pooling, unfreezes its last unit only and
    rebuilds from a checkpoint's stored architecture with the same features."""
    import open_clip

    from captioner.models.encoders.base import from_checkpoint

    vision, kind, last, first = OPEN_CLIP_TOWERS[tower]
    config = tmp_path / f"tiny-{tower}.json"
    config.write_text(json.dumps({**OPEN_CLIP_TINY, "vision_cfg": vision}))
    open_clip.add_model_config(config)
    weights = tmp_path / "w.pt"
    torch.save(open_clip.create_model(f"tiny-{tower}").state_dict(), weights)
    enc = OpenCLIPEncoder(f"tiny-{tower}", config=str(config), pretrained=str(weights),
                          trainable=True, trainable_layers=1)
    assert enc.kind == kind
    size = vision["image_size"]
    x = torch.randn(2, 3, size, size)
    feats = enc.eval()(x)  # (B, R, C): one vector per region, no pooled token
    regions = {"modified_resnet": (size // 32) ** 2, "timm_vit": (size // 16) ** 2,
               "timm_convnext": (size // 32) ** 2}[tower]
    assert feats.shape == (2, regions, enc.out_dim)
    grads = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert grads and not any(n.startswith(first) for n in grads)
    assert any(n.startswith(last) for n in grads)
    assert not any(n.startswith(("attnpool.", "head.")) for n in grads)  # pooling / projection
    enc.train()(x).sum().backward()
    assert all(p.grad is not None for n, p in enc.model.named_parameters() if n in grads)
    with from_checkpoint(enc.architecture()):  # as a checkpoint rebuilds it offline
        again = OpenCLIPEncoder(f"tiny-{tower}")
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(again.eval()(x), enc.eval()(x))
