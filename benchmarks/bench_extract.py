"""Feature-cache extraction throughput: where the time goes and what each change buys.

    python benchmarks/bench_extract.py [--images 256] [--rounds 3] [--data flickr8k|rsicd|synthetic]

Extracts EfficientNet-Lite0 grids (224 px, JPEG decoding included) from the same real photos
with several pipelines, interleaved round by round so that each ratio compares runs made under
the same machine conditions:

- ``decode only``: the data loader alone (JPEG decode + resize + normalise), no model;
- ``model only``: the folded channels-last encoder on pre-decoded batches, no decoding;
- pipelines of the two with different loader workers, compute threads and batch sizes,
  ``captioner.data``'s own extraction (``cached_features``) among them.

Every pipeline's features are checked against the plain encoder's (max abs difference).
Prints a table (images/s, median round, range) and writes ``bench_results/extract.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from captioner.data.feature_cache import ImageFiles, cached_features, collate_images  # noqa: E402
from captioner.data.images import build_transform  # noqa: E402
from captioner.models.encoder import EfficientNetLiteEncoder, inference_copy  # noqa: E402
from captioner.utils.cpu import keep_freed_memory  # noqa: E402
from captioner.utils.hardware import machine_info, machine_line  # noqa: E402


def image_paths(data: str, n: int) -> list[str]:
    if data == "synthetic":
        from captioner.data.synthetic import generate

        root = Path(tempfile.mkdtemp())
        generate(root, num_train=n, num_val=1, num_test=1, image_size=224, seed=0)
        return sorted(str(p) for p in (root / "images" / "train").glob("*.png"))[:n]
    folder = SHARED / data / "images"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not found (use --data synthetic)")
    return [str(p) for p in sorted(folder.glob("*.jpg"))[:n]]


def loader(paths, workers: int, batch: int) -> DataLoader:
    return DataLoader(ImageFiles(paths, build_transform(224), 10**8), batch_size=batch,
                      num_workers=workers, collate_fn=collate_images)


def run_pipeline(paths, model, workers: int, threads: int, batch: int) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(threads)
    start, out = time.perf_counter(), []
    with torch.inference_mode():
        for images, _, _ in loader(paths, workers, batch):
            out.append(model(images.contiguous(memory_format=torch.channels_last)))
    return time.perf_counter() - start, torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data", default="flickr8k" if (SHARED / "flickr8k").is_dir() else "synthetic")
    p.add_argument("--only", default="", help="run only the pipelines whose name contains this")
    p.add_argument("--out", default=str(ROOT / "bench_results" / "extract.json"))
    args = p.parse_args()
    keep_freed_memory()
    info = machine_info()
    print(machine_line(info), flush=True)
    paths = image_paths(args.data, args.images)
    n = len(paths)
    encoder = EfficientNetLiteEncoder().eval()
    fast = inference_copy(encoder)
    torch.set_num_threads(2)
    with torch.inference_mode():
        decoded = [imgs for imgs, _, _ in loader(paths, 0, 32)]
        reference = torch.cat([encoder(x) for x in decoded])

    def model_only(threads: int):
        def go():
            torch.set_num_threads(threads)
            start = time.perf_counter()
            with torch.inference_mode():
                out = torch.cat([fast(x.contiguous(memory_format=torch.channels_last)) for x in decoded])
            return time.perf_counter() - start, out
        return go

    def decode_only(workers: int):
        def go():
            start = time.perf_counter()
            for _ in loader(paths, workers, 32):
                pass
            return time.perf_counter() - start, None
        return go

    def library(workers: int, batch: int):
        def go():
            torch.set_num_threads(2)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                cache = cached_features(encoder, paths, build_transform(224), tmp, batch_size=batch,
                                        num_workers=workers, precision="fp32")
                took = time.perf_counter() - start
                return took, torch.from_numpy(cache.features[:].copy())
        return go

    variants = {
        "decode only, 0 workers": decode_only(0),
        "decode only, 1 worker": decode_only(1),
        "decode only, 2 workers": decode_only(2),
        "model only, 1 thread": model_only(1),
        "model only, 2 threads": model_only(2),
        "2 workers + 2 threads, batch 32": lambda: run_pipeline(paths, fast, 2, 2, 32),
        "1 worker + 2 threads, batch 32": lambda: run_pipeline(paths, fast, 1, 2, 32),
        "0 workers + 2 threads, batch 32": lambda: run_pipeline(paths, fast, 0, 2, 32),
        "1 worker + 2 threads, batch 64": lambda: run_pipeline(paths, fast, 1, 2, 64),
        "1 worker + 2 threads, batch 16": lambda: run_pipeline(paths, fast, 1, 2, 16),
        "0 workers + 2 threads, batch 16": lambda: run_pipeline(paths, fast, 0, 2, 16),
        "0 workers + 2 threads, batch 64": lambda: run_pipeline(paths, fast, 0, 2, 64),
        "cached_features (2 workers, batch 32): before": library(2, 32),
        "cached_features (0 workers, batch 16): now": library(0, 16),
    }
    variants = {k: v for k, v in variants.items() if args.only in k}
    times = {k: [] for k in variants}
    diffs = {}
    for r in range(args.rounds):
        for name, fn in variants.items():
            took, out = fn()
            times[name].append(took)
            if out is not None and name not in diffs:
                diffs[name] = float((out.float() - reference).abs().max())
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    print(f"\n{n} images ({args.data}), EfficientNet-Lite0 224 px, fp32")
    print(f"{'pipeline':<42}{'images/s':>10}  {'range':<14}{'max abs diff':>13}")
    for name, ts in times.items():
        rate = [n / t for t in ts]
        row = {"pipeline": name, "images_per_s": statistics.median(rate), "min": min(rate),
               "max": max(rate), "max_abs_diff": diffs.get(name)}
        rows.append(row)
        diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        print(f"{name:<42}{row['images_per_s']:>10.1f}  {row['min']:>5.1f}-{row['max']:<7.1f}{diff:>13}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "images": n, "data": args.data, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
