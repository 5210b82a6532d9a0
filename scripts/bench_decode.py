"""Decoding throughput: batched beam search vs one image at a time, plus batched greedy.

    python scripts/bench_decode.py [--images 256] [--beams 3 5] [--threads 2] [--device cpu]
                                   [--precision fp32 bf16]

Uses the project's Show-Attend-Tell ``LSTMDecoder`` (embed 512, hidden 512, attention 512,
vocab 5000, 7x7x512 grid) with random weights: an untrained decoder rarely emits EOS, so every
caption runs to ``max_length`` - the worst case, identical work for both beam variants. Each
precision (fp32, bf16 autocast) times batched and per-image search under the same setting.
Writes ``bench_results/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.search import beam_search, greedy_search
from captioner.utils.cpu import keep_freed_memory

PAD, BOS, EOS = 0, 1, 2


def build_decoder(vocab, enc, dim):
    return LSTMDecoder(vocab, enc, embed_dim=dim, hidden_size=dim, attention_dim=dim)


def timed(device, repeats, fn, *args, **kwargs):
    """Best wall time of ``repeats`` runs (the machine is shared: the minimum is the least
    disturbed) and the CPU time of that run, which other processes inflate less."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best, out


def per_image(decoder, feats, **kwargs):
    return [beam_search(decoder, feats[i : i + 1], **kwargs) for i in range(feats.size(0))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--beams", type=int, nargs="+", default=[3, 5])
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="bf16: the same search under bfloat16 autocast (decode.precision=bf16)")
    p.add_argument("--repeats", type=int, default=3, help="batched runs (best kept); per-image: 1")
    p.add_argument("--out", default="bench_results/decode.json")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py / evaluate.py do
    torch.manual_seed(0)
    device = torch.device(args.device)
    vocab, grid, enc, dim = 5000, 7, 512, 512
    decoder = build_decoder(vocab, enc, dim).to(device).eval()
    decoder_name = "captioner.models.lstm_decoder.LSTMDecoder"
    feats = torch.randn(args.images, grid * grid, enc, device=device)
    n, L = args.images, args.max_length
    common = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": L}

    rows = []
    rep = args.repeats
    for precision in args.precision:
        bf16 = precision == "bf16"
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            beam_search(decoder, feats[:8], beam_size=3, **common)  # warm-up
            sec, (g_tok, _) = timed(device, rep, greedy_search, decoder, feats, **common)
            rows.append({"precision": precision, "method": "greedy", "beam": 1, "mode": "batched",
                         "seconds": sec})
            for k in args.beams:
                sec_b, (tok_b, _, _) = timed(
                    device, rep, beam_search, decoder, feats, beam_size=k, **common
                )
                sec_1, singles = timed(device, 1, per_image, decoder, feats, beam_size=k, **common)
                # same algorithm, so the same captions (up to float ties from batched matmuls)
                same = sum(
                    torch.equal(tok_b[i, : s[0].size(1)], s[0][0]) for i, s in enumerate(singles)
                )
                rows.append({"precision": precision, "method": "beam", "beam": k,
                             "mode": "batched", "seconds": sec_b})
                rows.append({
                    "precision": precision, "method": "beam", "beam": k, "mode": "per-image",
                    "seconds": sec_1, "speedup_batched": sec_1[0] / sec_b[0],
                    "speedup_batched_cpu_time": sec_1[1] / sec_b[1], "same_captions": f"{same}/{n}",
                })

    for r in rows:
        r["seconds"], r["cpu_seconds"] = r["seconds"]
        r["captions_per_s"] = n / r["seconds"]
    mean_len = float((g_tok != PAD).sum(1).float().mean())

    print(f"decoder: {decoder_name}  images: {n}  max_length: {L}  threads: {args.threads}")
    print(f"device: {device}  greedy mean caption length: {mean_len:.1f}")
    head = f"{'dtype':<6}{'method':<8}{'beam':>5}  {'mode':<10}{'wall s':>8}{'cpu s':>8}{'captions/s':>12}"
    print(head + "  speed-up wall / cpu")
    for r in rows:
        speed = ""
        if "speedup_batched" in r:
            speed = f"{r['speedup_batched']:.1f}x / {r['speedup_batched_cpu_time']:.1f}x"
            speed += f"  (same captions {r['same_captions']})"
        print(
            f"{r['precision']:<6}{r['method']:<8}{r['beam']:>5}  {r['mode']:<10}{r['seconds']:>8.2f}"
            f"{r['cpu_seconds']:>8.2f}{r['captions_per_s']:>12.1f}  {speed}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "decoder": decoder_name,
        "vocab": vocab,
        "embed_hidden_attention": dim,
        "grid": f"{grid}x{grid}x{enc}",
        "images": n,
        "max_length": L,
        "threads": args.threads,
        "device": str(device),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "greedy_mean_length": mean_len,
    }
    out.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
