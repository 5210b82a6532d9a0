"""Decoding throughput: batched beam search vs one image at a time, plus batched greedy.

    python benchmarks/bench_decode.py [--images 256] [--beams 3 5] [--threads 2] [--device cpu]
                                   [--precision fp32 bf16] [--rounds 4]

Uses the project's Show-Attend-Tell ``LSTMDecoder`` (embed 512, hidden 512, attention 512,
vocab 5000, 7x7x512 grid) with random weights: an untrained decoder rarely emits EOS, so every
caption runs to ``max_length`` - the worst case, identical work for both beam variants. Each
precision (fp32, bf16 autocast) times batched and per-image search under the same setting.

The two are timed in interleaved pairs: round r runs the batched search over all images, then
the per-image loop over the r-th of ``--rounds`` slices of them. The machine's speed drifts
between minutes (other tenants) and the compute-bound batched search feels it more than the
memory-bound loop, so each round's speed-up compares two runs made under the same conditions;
the table gives the median round and the range. Over all rounds the loop captions every image
once, and those captions are checked against the batched ones.
Writes ``bench_results/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.search import beam_search, greedy_search
from captioner.utils.cpu import keep_freed_memory
from captioner.utils.hardware import benchmark_precisions, machine_info, machine_line

PAD, BOS, EOS = 0, 1, 2


def build_decoder(vocab, enc, dim):
    return LSTMDecoder(vocab, enc, embed_dim=dim, hidden_size=dim, attention_dim=dim)


def timed(device, fn, *args, **kwargs):
    """Wall time and CPU time (which other processes inflate less) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def per_image(decoder, feats, **kwargs):
    return [beam_search(decoder, feats[i : i + 1], **kwargs) for i in range(feats.size(0))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--beams", type=int, nargs="+", default=[3, 5])
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="bf16: the same search under bfloat16 autocast (decode.precision=bf16); "
                        "default: fp32, plus bf16 where the CPU runs it natively")
    p.add_argument("--rounds", type=int, default=4,
                   help="interleaved (batched, per-image slice) pairs per setting")
    p.add_argument("--out", default="bench_results/decode.json")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py / evaluate.py do
    info = machine_info()
    print(machine_line(info), flush=True)
    torch.manual_seed(0)
    device = torch.device(args.device)
    vocab, grid, enc, dim = 5000, 7, 512, 512
    decoder = build_decoder(vocab, enc, dim).to(device).eval()
    decoder_name = "captioner.models.lstm_decoder.LSTMDecoder"
    feats = torch.randn(args.images, grid * grid, enc, device=device)
    n, L = args.images, args.max_length
    common = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": L}
    rounds = max(1, min(args.rounds, n))
    slices = torch.arange(n).tensor_split(rounds)  # the per-image loop's share of each round

    rows = []
    for precision in benchmark_precisions(args.precision):
        bf16 = precision == "bf16"
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            beam_search(decoder, feats[:8], beam_size=3, **common)  # warm-up
            runs = [timed(device, greedy_search, decoder, feats, **common) for _ in range(rounds)]
            g_tok = runs[0][1][0]
            rows.append({"precision": precision, "method": "greedy", "beam": 1, "mode": "batched",
                         "round_seconds": [sec for sec, _ in runs]})
            for k in args.beams:
                batched, looped, ratio, ratio_cpu, same = [], [], [], [], 0
                for idx in slices:
                    sec_b, (tok_b, _, _) = timed(device, beam_search, decoder, feats, beam_size=k,
                                                 **common)  # fmt: skip
                    sec_1, singles = timed(device, per_image, decoder, feats[idx], beam_size=k,
                                           **common)  # fmt: skip
                    batched.append(sec_b)
                    looped.append(sec_1)
                    # this round's speed-up: the loop's time scaled to all n images over batched
                    ratio.append(sec_1[0] * n / len(idx) / sec_b[0])
                    ratio_cpu.append(sec_1[1] * n / len(idx) / sec_b[1])
                    # same algorithm, so the same captions (up to float ties of batched matmuls)
                    same += sum(torch.equal(tok_b[i, : s[0].size(1)], s[0][0])
                                for i, s in zip(idx.tolist(), singles))  # fmt: skip
                rows.append({"precision": precision, "method": "beam", "beam": k,
                             "mode": "batched", "round_seconds": batched})
                rows.append({
                    "precision": precision, "method": "beam", "beam": k, "mode": "per-image",
                    "round_seconds": looped, "images_per_round": [len(i) for i in slices],
                    "speedup_rounds": ratio, "speedup_batched": statistics.median(ratio),
                    "speedup_batched_cpu_time": statistics.median(ratio_cpu),
                    "same_captions": f"{same}/{n}",
                })

    for r in rows:
        wall = [w for w, _ in r["round_seconds"]]
        cpu = [c for _, c in r["round_seconds"]]
        if r["mode"] == "batched":  # median run over all n images
            r["seconds"], r["cpu_seconds"] = statistics.median(wall), statistics.median(cpu)
        else:  # the whole loop once, summed over the rounds' slices
            r["seconds"], r["cpu_seconds"] = sum(wall), sum(cpu)
        r["captions_per_s"] = n / r["seconds"]
    mean_len = float((g_tok != PAD).sum(1).float().mean())

    print(f"decoder: {decoder_name}  images: {n}  max_length: {L}  threads: {args.threads}")
    print(f"device: {device}  greedy mean caption length: {mean_len:.1f}  rounds: {rounds}")
    head = f"{'dtype':<6}{'method':<8}{'beam':>5}  {'mode':<10}{'wall s':>8}{'cpu s':>8}{'captions/s':>12}"
    print(head + "  speed-up wall (rounds' range) / cpu")
    for r in rows:
        speed = ""
        if "speedup_batched" in r:
            lo, hi = min(r["speedup_rounds"]), max(r["speedup_rounds"])
            speed = f"{r['speedup_batched']:.1f}x ({lo:.1f}-{hi:.1f}) / "
            speed += f"{r['speedup_batched_cpu_time']:.1f}x  (same captions {r['same_captions']})"
        print(
            f"{r['precision']:<6}{r['method']:<8}{r['beam']:>5}  {r['mode']:<10}{r['seconds']:>8.2f}"
            f"{r['cpu_seconds']:>8.2f}{r['captions_per_s']:>12.1f}  {speed}"
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        **info,
        "decoder": decoder_name,
        "vocab": vocab,
        "embed_hidden_attention": dim,
        "grid": f"{grid}x{grid}x{enc}",
        "images": n,
        "max_length": L,
        "rounds": rounds,
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
