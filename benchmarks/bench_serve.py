"""Serving throughput and latency: the same server with dynamic batching on and off, side by side.

    python benchmarks/bench_serve.py [--levels 1 4 16 64] [--seconds 8] [--max-requests 1500]
                                     [--checkpoint PATH] [--batch 16] [--batch-timeout-ms 10]

Starts two ``captioner-serve`` processes on loopback ports with one checkpoint: one batching up
to ``--batch`` requests that arrive within ``--batch-timeout-ms``, one with batching off
(``--max-batch-size 1``). For each number of concurrent clients, a local async client (httpx)
keeps that many requests in flight against each server in turn (the order alternates between
levels, so drift on a shared machine hits both) for ``--seconds`` or ``--max-requests``, whichever
comes first, and reports throughput, p50/p99 latency and the servers' CPU time per caption (all
their processes; on a shared machine this inflates far less than wall time). Every request
uploads the same 320x240 JPEG photo as a multipart form; one not answered 200 counts as failed.

Without ``--checkpoint`` it writes an untrained checkpoint of realistic size: a ResNet-18 cut
after layer2 (64 px photos: an 8x8 grid of 128 channels) and the default Show-Attend-Tell decoder
(embedding 256, LSTM 512, attention 256) over a 5,000-word vocabulary, decoding with beam 3 up to
20 tokens. An untrained decoder rarely emits EOS, so every caption runs to 20 tokens: the worst
case, the same work in both arms. Writes ``bench_results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageDraw

from captioner.checkpoint import build_model, save_checkpoint
from captioner.data.tokenizer import train_tokenizer, with_vocabulary
from captioner.serve.launch import served
from captioner.utils.hardware import auto_threads, machine_info, machine_line


def write_checkpoint(path: Path, vocab: int, image_size: int, beam: int, max_length: int) -> dict:
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(vocab - 4))])  # + 4 special tokens
    model = {
        "_target_": "captioner.models.captioner.Captioner",
        "encoder": {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
                    "return_layer": "layer2"},
        "decoder": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
                    "embed_dim": 256, "hidden_size": 512, "attention_dim": 256}}
    config = with_vocabulary(model, tok)
    torch.manual_seed(0)
    net = build_model(config)
    decode = {"method": "beam", "beam_size": beam, "max_length": max_length, "precision": "auto"}
    save_checkpoint(path, net, config, tok, decode, image_size)
    return {"encoder": "ResNet-18 to layer2, untrained", "image_size": image_size,
            "decoder": "LSTMDecoder 256/512/256, untrained", "vocab": len(tok), "beam": beam,
            "max_length": max_length, "parameters": sum(p.numel() for p in net.parameters())}


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants so far (Linux /proc): the
    servers' work per caption, which other processes on a shared machine inflate far less than
    wall time."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        if p in stats:
            total += int(stats[p][11]) + int(stats[p][12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def photo_bytes() -> bytes:
    img = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((30, 60, 130, 160), fill="red")
    draw.ellipse((190, 70, 290, 170), fill="blue")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def load(url: str, clients: int, seconds: float, max_requests: int, photo: bytes) -> dict:
    """``clients`` loops each keeping one request in flight; latencies of the answered ones."""
    latencies, failures, batch_sizes = [], [], []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        warm = [client.post("/caption", files={"image": ("p.jpg", photo)}) for _ in range(clients)]
        await asyncio.gather(*warm)  # connections open, worker warm
        started = time.perf_counter()
        deadline = started + seconds
        issued = 0

        async def one_client():
            nonlocal issued
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/caption", files={"image": ("p.jpg", photo)})
                except httpx.HTTPError as e:
                    failures.append(type(e).__name__)
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(r.json()["batch_size"])

        await asyncio.gather(*[one_client() for _ in range(clients)])
        elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(latencies), "failed": len(failures),
            "failures": failures[:5], "seconds": elapsed,
            "throughput": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * q[98], "mean_batch": statistics.mean(batch_sizes)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="per level and server")
    p.add_argument("--max-requests", type=int, default=1500, help="per level and server")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: an untrained one")
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batching server")
    p.add_argument("--batch-timeout-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of both servers (default: threads=auto, decided once)")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds a server may take to load (a busy machine needs more)")
    p.add_argument("--out", default="bench_results/serve.json")
    args = p.parse_args()

    info = machine_info()
    print(machine_line(info) + f", torch CPU capability {info['cpu_capability']}", flush=True)
    threads = args.threads or auto_threads()[0]
    photo = photo_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            ckpt = Path(tmp) / "bench.ckpt"
            model = write_checkpoint(ckpt, args.vocab, args.image_size, args.beam, args.max_length)
        else:
            ckpt, model = args.checkpoint, {"checkpoint": str(args.checkpoint)}
        common = ["--checkpoint", str(ckpt), "--threads", str(threads), "--log-level", "error"]
        arms = {"batched": ["--max-batch-size", str(args.batch),
                            "--batch-timeout-ms", str(args.batch_timeout_ms)],
                "unbatched": ["--max-batch-size", "1"]}
        rows = []
        logs = {name: open(Path(tmp) / f"{name}.log", "w") for name in arms}
        wait = args.start_timeout
        with served(common + arms["batched"], wait, logs["batched"]) as batched, \
                served(common + arms["unbatched"], wait, logs["unbatched"]) as unbatched:
            servers = {"batched": batched, "unbatched": unbatched}
            for i, clients in enumerate(args.levels):
                order = ["batched", "unbatched"] if i % 2 == 0 else ["unbatched", "batched"]
                for name in order:
                    cpu = tree_cpu_seconds(servers[name].pid)
                    row = asyncio.run(load(servers[name].url, clients, args.seconds,
                                           args.max_requests, photo))
                    # per answered request, the warm-up requests (one per client) included
                    cpu = tree_cpu_seconds(servers[name].pid) - cpu
                    row["server_cpu_ms_per_caption"] = 1000 * cpu / (row["requests"] + clients)
                    row["server"] = name
                    rows.append(row)
                    print(f"  {name:<10} {clients:>3} clients: {row['throughput']:6.1f} captions/s, "
                          f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, "
                          f"server CPU {row['server_cpu_ms_per_caption']:.0f} ms/caption, "
                          f"failed {row['failed']}", flush=True)
        for f in logs.values():
            f.close()

    by = {(r["server"], r["clients"]): r for r in rows}
    print()
    print(machine_line(info) + f", torch CPU capability {info['cpu_capability']}")
    print(f"model: {model}; server threads: {threads}; batching: up to {args.batch} requests "
          f"within {args.batch_timeout_ms:g} ms")
    print(f"{'clients':>7} | {'batched/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch':>5} | "
          f"{'unbatched/s':>11} {'p50 ms':>8} {'p99 ms':>8} | {'speed-up':>8} | "
          f"{'CPU ms/caption':>14} | failed")
    ratios = {}
    for clients in args.levels:
        b, u = by[("batched", clients)], by[("unbatched", clients)]
        ratios[clients] = b["throughput"] / u["throughput"]
        print(f"{clients:>7} | {b['throughput']:>9.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f} "
              f"{b['mean_batch']:>5.1f} | {u['throughput']:>11.1f} {u['p50_ms']:>8.1f} "
              f"{u['p99_ms']:>8.1f} | {ratios[clients]:>7.2f}x | "
              f"{b['server_cpu_ms_per_caption']:>6.0f} / {u['server_cpu_ms_per_caption']:<5.0f} | "
              f"{b['failed'] + u['failed']}")
    failed = sum(r["failed"] for r in rows)
    verdict = ratios.get(16, 0) >= 3 and failed == 0
    print(f"16 clients: {ratios.get(16, float('nan')):.2f}x the throughput with batching off, "
          f"{failed} failed requests: {'PASS' if verdict else 'FAIL'} (needs >= 3x and 0 failed)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {**info, "model": model, "threads": threads, "batch": args.batch,
                   "batch_timeout_ms": args.batch_timeout_ms, "seconds": args.seconds,
                   "max_requests": args.max_requests, "photo": "320x240 JPEG, multipart",
                   "date": time.strftime("%Y-%m-%d")},
        "results": rows, "speedup": {str(k): v for k, v in ratios.items()}, "pass": verdict,
    }, indent=2))
    print(f"wrote {out}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
