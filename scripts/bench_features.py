"""Training epoch time from cached encoder features vs from raw images, same data and decoder.

    python scripts/bench_features.py [--data coco_mini|synthetic] [--epochs 2] [--threads 2]

Frozen pretrained EfficientNet-Lite0 (224 px, 7x7x1280 grid) + the project's attention LSTM
(embed 256, hidden 512, attention 256): one training epoch = load every training image's batch,
encode (raw path only; frozen, no gradients), teacher-forced loss, backward, Adam step. The
cache is built first and its one-off extraction time is reported separately. Epoch times are
the median over ``--epochs`` epochs after one warm-up epoch. Writes
``bench_results/features.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.data.datamodule import CaptionDataModule
from captioner.data.images import build_transform
from captioner.features.cache import cached_features
from captioner.models.encoder import EfficientNetLiteEncoder
from captioner.models.lstm_decoder import LSTMDecoder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "coco-mini"


def make_datamodule(kind: str, tmp: Path, workers: int) -> CaptionDataModule:
    if kind == "coco_mini":
        ann, img = SHARED / "annotations", SHARED / "images"
        splits = {"train": {"annotations": str(ann / "captions_train2017.json"),
                            "images": str(img / "train2017")}}
        dm = CaptionDataModule(splits, image_size=224, batch_size=16, num_workers=workers,
                               min_word_frequency=2, cache_dir=str(tmp / "cache"))
    else:
        from captioner.data.synthetic import generate

        generate(tmp / "syn", num_train=256, num_val=8, num_test=8, image_size=64, seed=0)
        splits = {"train": {"annotations": str(tmp / "syn/annotations/captions_train.json"),
                            "images": str(tmp / "syn/images")}}
        dm = CaptionDataModule(splits, image_size=224, batch_size=16, num_workers=workers,
                               cache_dir=str(tmp / "cache"))
    dm.setup()
    return dm


def epoch(loader, encoder, decoder, optimizer, pad_id) -> float:
    start = time.perf_counter()
    for batch in loader:
        if "features" in batch:
            feats = batch["features"]  # (B, R, C)
        else:
            with torch.no_grad():
                feats = encoder(batch["images"])  # (B, R, C)
        captions = batch["captions"]  # (B, k, T)
        B, k, T = captions.shape
        tokens = captions.view(B * k, T)
        logits, _ = decoder(feats, tokens[:, :-1])  # (B*k, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                               ignore_index=pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["coco_mini", "synthetic"],
                   default="coco_mini" if SHARED.is_dir() else "synthetic")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "features.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        dm = make_datamodule(args.data, Path(tmp), args.workers)
        encoder = EfficientNetLiteEncoder().eval()  # pretrained, frozen
        tok = dm.tokenizer
        decoder = LSTMDecoder(vocab_size=len(tok), encoder_dim=encoder.out_dim, pad_id=tok.pad_token_id,
                              embed_dim=256, hidden_size=512, attention_dim=256)
        optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
        n_images = len(dm.table("train"))

        t0 = time.perf_counter()
        cached_features(encoder, dm.table("train")["path"], build_transform(dm.image_size),
                        dm.cache_dir, name="train", batch_size=32, num_workers=args.workers)
        extract_s = time.perf_counter() - t0

        results = {}
        for mode in ("cached", "raw"):
            dm.cache_features = mode == "cached"
            dm.set_encoder(encoder if dm.cache_features else None)
            loader = dm.train_dataloader()
            times = [epoch(loader, encoder, decoder, optimizer, tok.pad_token_id)
                     for _ in range(args.epochs + 1)][1:]  # first: warm-up
            results[mode] = statistics.median(times)

    speedup = results["raw"] / results["cached"]
    report = {
        "data": args.data, "train_images": n_images, "image_size": dm.image_size,
        "batch_size": dm.batch_size, "encoder": "efficientnet_lite0 (pretrained, frozen)",
        "grid": [49, encoder.out_dim], "decoder": "lstm embed 256 hidden 512 attention 256",
        "threads": args.threads, "workers": args.workers, "epochs_timed": args.epochs,
        "extract_s": round(extract_s, 2), "epoch_raw_s": round(results["raw"], 2),
        "epoch_cached_s": round(results["cached"], 2), "speedup": round(speedup, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
    }
    print("| data | images | extract once (s) | epoch from images (s) | epoch from cache (s) | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.data} | {n_images} | {extract_s:.1f} | {results['raw']:.2f} | "
          f"{results['cached']:.2f} | {speedup:.1f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
