"""Training epoch time from cached encoder features vs from raw images, same data and decoder.

    python benchmarks/bench_features.py [--data flickr8k|rsicd|synthetic] [--epochs 3] [--threads 2]
                                     [--decoder demo|lstm_attention] [--num-images 640] [--captions-per-image 5]
                                     [--batch-size 16] [--precision fp32|bf16] [--encoder NAME]

``flickr8k`` / ``rsicd``: the first ``--num-images`` training photographs (224x224 JPEGs).
``--captions-per-image``: how many of each image's captions one epoch trains (5: all, one image
read per 5 captions; 1: one random caption per image per epoch, the cheapest decoder epoch).

Frozen pretrained EfficientNet-Lite0 (224 px, 7x7x1280 grid) + the project's attention LSTM
(``demo``: embed 128, hidden 256, attention 128, the demo preset's size; ``lstm_attention``: the lstm_attention config's 256/512/256).
One training epoch = every training image once in batches of ``--batch-size`` (``--precision bf16``:
encoder and decoder forward under bf16 autocast, as ``trainer.precision=bf16-mixed`` runs them): raw path = JPEG decode + resize
in ``--workers`` loader processes, encoder forward (frozen, no gradients), teacher-forced loss,
backward, Adam step; cached path = the same with the grid read from the cache instead. Both paths
train identical copies of the decoder on the same shuffled image order (same seed per epoch), and
their epochs are interleaved (alternating which goes first), so a change in machine load hits
both alike. Epoch times: median over ``--epochs`` epochs after one warm-up epoch each. The cache
is built first (its one-off extraction time reported separately) and checked against a direct
encoder forward pass on the same images. "grids only" times the part the cache replaces: iterating
the loader and (raw path) running the encoder, without the decoder. Prints a table; writes ``bench_results/features.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.data.captions import write_coco_subset
from captioner.data.datamodule import CaptionDataModule
from captioner.data.feature_cache import cached_features
from captioner.data.images import build_transform, load_image
from captioner.models.encoder import CNNEncoder, EfficientNetLiteEncoder
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.utils.cpu import keep_freed_memory
from captioner.utils.hardware import machine_info, machine_line

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def make_datamodule(kind: str, tmp: Path, workers: int, num_images: int, k: int,
                    batch_size: int) -> CaptionDataModule:
    if kind in ("rsicd", "flickr8k"):  # the first N training photos of ../shared/data/<kind>
        root = SHARED / kind
        splits = {"train": {"annotations": str(write_coco_subset(
            root / "annotations" / "captions_train.json", num_images, tmp / f"{kind}_train_subset.json")),
                            "images": str(root / "images")}}
        dm = CaptionDataModule(splits, image_size=224, batch_size=batch_size, num_workers=workers,
                               captions_per_image=k, cache_dir=str(tmp / "cache"))
    else:
        from captioner.data.synthetic import generate

        generate(tmp / "syn", num_train=256, num_val=8, num_test=8, image_size=64, seed=0)
        splits = {"train": {"annotations": str(tmp / "syn/annotations/captions_train.json"),
                            "images": str(tmp / "syn/images")}}
        dm = CaptionDataModule(splits, image_size=224, batch_size=batch_size, num_workers=workers,
                               captions_per_image=k, cache_dir=str(tmp / "cache"))
    dm.setup()
    return dm


def epoch(loader, encoder, decoder, optimizer, pad_id, bf16: bool) -> float:
    start = time.perf_counter()
    for batch in loader:
        # as under Lightning's bf16-mixed: encoder and decoder forward both in autocast
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            if "features" in batch:
                feats = batch["features"]  # (B, R, C)
            else:
                with torch.no_grad():
                    feats = encoder(batch["images"])  # (B, R, C)
            captions = batch["captions"]  # (B, k, T)
            B, k, T = captions.shape
            tokens = captions.view(B * k, T)
            logits, _ = decoder(feats, tokens[:, :-1])  # (B*k, T-1, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   tokens[:, 1:].reshape(-1), ignore_index=pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


DECODERS = {"demo": dict(embed_dim=128, hidden_size=256, attention_dim=128),
            "lstm_attention": dict(embed_dim=256, hidden_size=512, attention_dim=256)}


@torch.no_grad()
def max_feature_diff(cache, dm, encoder, n: int = 16) -> float:
    """Largest |cached - direct forward| over the first n training images."""
    transform = build_transform(dm.image_size)
    paths = dm.table("train")["path"][:n]
    images = torch.stack([transform(load_image(p)) for p in paths])
    return (cache.rows(list(range(len(paths)))) - encoder(images)).abs().max().item()


def input_epoch(loader, encoder, bf16: bool) -> float:
    """The part the cache replaces: every batch's grid (read, or decoded + encoded), no decoder."""
    start = time.perf_counter()
    for batch in loader:
        if "features" not in batch:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                encoder(batch["images"])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["flickr8k", "rsicd", "synthetic"],
                   default="flickr8k" if (SHARED / "flickr8k").is_dir() else "synthetic")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-images", type=int, default=640,
                   help="flickr8k / rsicd: the first N training images")
    p.add_argument("--captions-per-image", type=int, default=5,
                   help="captions trained per image and epoch (data.captions_per_image)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="raw path's image-loading processes")
    p.add_argument("--decoder", choices=sorted(DECODERS), default="demo")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (rsicd preset: 32)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: encoder and decoder under bf16 autocast (trainer.precision=bf16-mixed)")
    p.add_argument("--encoder", default="efficientnet_lite0",
                   help="efficientnet_lite0 (ImageNet weights) or a torchvision name, e.g. resnet101 "
                        "(the Show-Attend-Tell tutorial's encoder; random weights, same cost)")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "features.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py / evaluate.py do
    torch.manual_seed(0)
    info = machine_info()
    print(machine_line(info), flush=True)
    if args.precision == "bf16" and not info["native_bf16"]:
        print("warning: this CPU emulates bf16; the bf16 numbers measure the emulation", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        dm = make_datamodule(args.data, Path(tmp), args.workers, args.num_images,
                             args.captions_per_image, args.batch_size)
        bf16 = args.precision == "bf16"
        if args.encoder == "efficientnet_lite0":
            encoder = EfficientNetLiteEncoder().eval()  # pretrained, frozen
        else:  # torchvision architecture, random weights: the same work as trained ones
            encoder = CNNEncoder(args.encoder, trainable=False).eval()
        tok = dm.tokenizer
        decoder = LSTMDecoder(vocab_size=len(tok), encoder_dim=encoder.out_dim,
                              pad_id=tok.pad_token_id, **DECODERS[args.decoder])
        n_images = len(dm.table("train"))

        t0 = time.perf_counter()
        cache = cached_features(encoder, dm.table("train")["path"], build_transform(dm.image_size),
                                dm.cache_dir, name="train", batch_size=dm.eval_batch_size,
                                num_workers=args.workers, precision=args.precision)
        extract_s = time.perf_counter() - t0
        diff = max_feature_diff(cache, dm, encoder)

        loaders, models = {}, {}
        for mode in ("cached", "raw"):
            dm.cache_features = mode == "cached"
            dm.set_encoder(encoder if dm.cache_features else None)
            loaders[mode] = dm.train_dataloader()
            dec = copy.deepcopy(decoder)
            models[mode] = (dec, torch.optim.Adam(dec.parameters(), lr=1e-3))
        times = {"cached": [], "raw": []}
        for e in range(args.epochs + 1):  # epoch 0: warm-up (worker start-up, page cache)
            for mode in (("raw", "cached") if e % 2 else ("cached", "raw")):
                torch.manual_seed(1000 + e)  # the same image order for both paths
                dec, opt = models[mode]
                times[mode].append(epoch(loaders[mode], encoder, dec, opt, tok.pad_token_id, bf16))
        results = {m: statistics.median(t[1:]) for m, t in times.items()}
        inputs = {"cached": [], "raw": []}
        for e in range(args.epochs):
            for mode in (("raw", "cached") if e % 2 else ("cached", "raw")):
                torch.manual_seed(1000 + e)
                inputs[mode].append(input_epoch(loaders[mode], encoder, bf16))
        input_s = {m: statistics.median(t) for m, t in inputs.items()}

    speedup = results["raw"] / results["cached"]
    report = {
        "data": args.data, "train_images": n_images, "image_size": dm.image_size,
        "batch_size": dm.batch_size, "precision": args.precision, "captions_per_image": args.captions_per_image, "encoder": f"{args.encoder} (frozen)",
        "grid": [cache.meta["shape"][1], encoder.out_dim], "decoder": f"lstm {args.decoder} {DECODERS[args.decoder]}",
        "threads": args.threads, "raw_workers": args.workers, "epochs_timed": args.epochs,
        "extract_s": round(extract_s, 2), "epoch_raw_s": round(results["raw"], 3),
        "epoch_cached_s": round(results["cached"], 3), "speedup": round(speedup, 1),
        "input_raw_s": round(input_s["raw"], 3), "input_cached_s": round(input_s["cached"], 4),
        "input_speedup": round(input_s["raw"] / input_s["cached"]),
        "epochs_raw_s": [round(t, 3) for t in times["raw"]],
        "epochs_cached_s": [round(t, 3) for t in times["cached"]],
        "max_abs_diff_vs_forward": diff,
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), **info,
    }
    print("| data | images | encoder | captions/image | decoder | batch | precision | threads | extract once (s) | epoch from images (s) "
          "| epoch from cache (s) | speed-up | grids only: images (s) | grids only: cache (s) "
          "| speed-up | max abs diff vs forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.data} | {n_images} | {args.encoder} | {args.captions_per_image} | {args.decoder} | {args.batch_size} | {args.precision} | {args.threads} | {extract_s:.1f} | "
          f"{results['raw']:.2f} | {results['cached']:.3f} | {speedup:.1f}x | {input_s['raw']:.2f} | "
          f"{input_s['cached']:.4f} | {input_s['raw'] / input_s['cached']:.0f}x | {diff:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
