"""Threads on a quiet and on a busy machine: what ``threads=auto`` must choose.

    python benchmarks/bench_threads.py [--steps 6] [--rounds 3]

Times the training step of the Flickr8k/RSICD recipe (cached 7x7x1280 EfficientNet-Lite0 grids,
attention LSTM, batch 32 images x 5 captions) with 1 and 2 torch threads, first on the quiet
machine, then while a second process spins on one core (a stand-in for another job), all in one
process, interleaved round by round. Also reports what ``threads=auto`` resolves to in each
state. Prints a table and writes ``bench_results/threads.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.models.lstm_decoder import LSTMDecoder  # noqa: E402
from captioner.utils.cpu import keep_freed_memory  # noqa: E402
from captioner.utils.hardware import auto_threads, machine_info, machine_line  # noqa: E402


def spin(seconds: float) -> None:
    """Hold one core busy for at most ``seconds`` (bounded: it stops by itself)."""
    end = time.time() + seconds
    while time.time() < end:
        pass


def make_step(batch: int = 32, k: int = 5, vocab: int = 3000, words: int = 14):
    torch.manual_seed(0)
    decoder = LSTMDecoder(vocab_size=vocab, encoder_dim=1280, pad_id=0).train()
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-4)
    grid = torch.randn(batch, 49, 1280)
    tokens = torch.randint(3, vocab, (batch * k, words))
    tokens[:, 0] = 1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits, _ = decoder(grid.repeat_interleave(k, 0), tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    return step


def steps_per_s(step, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    step()  # warm-up at this thread count
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench_results" / "threads.json"))
    args = p.parse_args()
    keep_freed_memory()
    info = machine_info()
    print(machine_line(info), flush=True)
    step = make_step()
    rates = {(state, t): [] for state in ("quiet", "busy") for t in (1, 2)}
    auto = {}
    for state in ("quiet", "busy"):
        spinner = None
        if state == "busy":
            spinner = mp.get_context("spawn").Process(target=spin, args=(3600,), daemon=True)
            spinner.start()
            time.sleep(0.5)
        try:
            auto[state] = auto_threads()
            for _ in range(args.rounds):
                for t in (1, 2):
                    rates[(state, t)].append(steps_per_s(step, t, args.steps))
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.join()
    rows = []
    print(f"\n{'machine':<8}{'threads':>8}{'steps/s':>10}  range")
    for (state, t), r in rates.items():
        rows.append({"state": state, "threads": t, "steps_per_s": statistics.median(r),
                     "min": min(r), "max": max(r)})
        print(f"{state:<8}{t:>8}{statistics.median(r):>10.2f}  {min(r):.2f}-{max(r):.2f}")
    for state, (_, reason) in auto.items():
        print(f"threads=auto on the {state} machine: {reason}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows,
                               "auto": {k: {"threads": v[0], "reason": v[1]} for k, v in auto.items()}},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
