#!/usr/bin/env python
"""Benchmark the in-process CIDEr-D / BLEU against pycocoevalcap's Cider / Bleu.

5,000 synthetic hypotheses x 5 references (Zipf-distributed words from a seeded vocabulary of
realistic size, 8-20 tokens), median of a few timed repeats after a warm-up.  Prints a table
and writes ``bench_results/metrics.json``; exits non-zero if the values differ by > 1e-6.

    python benchmarks/bench_metrics.py [--images 5000] [--refs 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from captioner.metrics.bleu import bleu  # noqa: E402  (after the path fix above)
from captioner.metrics.cider import CiderD, cider_d  # noqa: E402


def make_corpus(n_img: int, n_ref: int, vocab_size: int = 10000, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, size=rng.integers(2, 10)))
                    for _ in range(vocab_size * 2)})[:vocab_size]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    vocab = np.array(vocab, dtype=object)

    def sent():
        return " ".join(vocab[rng.choice(len(vocab), size=int(rng.integers(8, 21)), p=p)])

    refs = {i: [sent() for _ in range(n_ref)] for i in range(n_img)}
    hyps = {i: sent() for i in range(n_img)}
    return refs, hyps


def timeit(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench_results" / "metrics.json")
    args = ap.parse_args(argv)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = make_corpus(args.images, args.refs)
    res = {k: [v] for k, v in hyps.items()}
    ids = list(refs)

    def coco_bleu():
        with contextlib.redirect_stdout(io.StringIO()):
            return Bleu(4).compute_score(refs, res)

    scorer = CiderD(refs)
    rows = {}
    t_cc, (c_ref, c_ref_per) = timeit(lambda: Cider().compute_score(refs, res), args.repeats)
    t_c, (c_ours, c_per) = timeit(lambda: cider_d(refs, hyps), args.repeats)
    t_cs, cs = timeit(lambda: scorer.score([hyps[i] for i in ids], [refs[i] for i in ids]),
                      args.repeats)
    t_bc, (b_ref, b_ref_per) = timeit(coco_bleu, args.repeats)
    t_b, (b_ours, b_per) = timeit(lambda: bleu(refs, hyps), args.repeats)

    errs = {
        "cider_corpus": abs(c_ref - c_ours),
        "cider_per_image": float(np.max(np.abs(np.asarray(c_ref_per)
                                               - np.array([c_per[i] for i in ids])))),
        "ciderd_scorer_per_image": float(np.max(np.abs(np.asarray(c_ref_per) - cs))),
        "bleu_corpus": float(np.max(np.abs(np.asarray(b_ref) - np.asarray(b_ours)))),
        "bleu_per_image": float(max(np.max(np.abs(np.asarray(b_ref_per[k])
                                                  - np.array([b_per[i][k] for i in ids])))
                                    for k in range(4))),
    }
    rows = [
        ("pycocoevalcap Cider", t_cc, 1.0),
        ("cider_d (ours)", t_c, t_cc / t_c),
        ("CiderD.score (ours, corpus IDF)", t_cs, t_cc / t_cs),
        ("pycocoevalcap Bleu", t_bc, 1.0),
        ("bleu (ours)", t_b, t_bc / t_b),
    ]
    print(f"{args.images} hypotheses x {args.refs} references, median of {args.repeats}")
    print(f"{'name':<34}{'seconds':>10}{'speed-up':>10}")
    for name, t, s in rows:
        print(f"{name:<34}{t:>10.4f}{s:>9.1f}x")
    print(f"CIDEr-D {c_ours:.6f} (pycocoevalcap {c_ref:.6f}); BLEU-4 {b_ours[3]:.6f} "
          f"(pycocoevalcap {b_ref[3]:.6f}); max abs diff {max(errs.values()):.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "images": args.images, "refs_per_image": args.refs, "repeats": args.repeats,
        "python": platform.python_version(), "numpy": np.__version__,
        "seconds": {name: t for name, t, _ in rows},
        "speedup": {"cider_d": t_cc / t_c, "ciderd_scorer": t_cc / t_cs, "bleu": t_bc / t_b},
        "values": {"cider_ours": c_ours, "cider_pycocoevalcap": float(c_ref),
                   "bleu_ours": list(b_ours), "bleu_pycocoevalcap": list(b_ref)},
        "max_abs_diff": errs,
    }, indent=2))
    print(f"wrote {args.out}")
    bad = {k: v for k, v in errs.items() if not v <= 1e-6}
    if bad:
        print(f"MISMATCH vs pycocoevalcap: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
