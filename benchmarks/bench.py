"""Training and decoding throughput at the Show-Attend-Tell tutorial's shapes, side by side.

    python benchmarks/bench.py [--threads 2] [--device cpu] [--repeats 5] [--quick]

Shapes (GitHub issue 8): batch 64, cached 7x7x512 features, vocabulary 5,000, embedding /
attention / LSTM sizes 512, captions of 10-20 words (uniform, fixed seed), one caption per image.

Measures, all in one process so the ratios share the machine's conditions:
- matmul GFLOP/s (2048x2048x2048, fp32 and bf16): the bound the training steps are judged by;
- one training step (forward + backward + Adam) of the project's ``LSTMDecoder`` and of a plain
  re-implementation of the tutorial's step (below: key projection recomputed every step, batch
  sorted by length and shrunk as captions end, per-step vocabulary projection), fp32 and bf16
  autocast; images/s and the fraction of the FLOP bound (useful FLOPs, see ``lstm_step_flops``
  and ``transformer_step_flops``);
- optionally (``--transformer``) the 3-layer d_model 512 Transformer decoder's step, and
  (``--compile``) torch.compile'd twins of our decoders (``train.py compile=true``);
- batched greedy and beam-5 captions/s (``bench_decode``'s decoder).

Every time is the median of ``--repeats`` runs after warm-up. Writes ``bench_results/bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import BOS, EOS, PAD, build_decoder  # noqa: E402
from tutorial_baseline import TutorialDecoder  # noqa: E402

from captioner.models.lstm_decoder import LSTMDecoder  # noqa: E402
from captioner.models.search import beam_search, greedy_search  # noqa: E402
from captioner.utils.cpu import keep_freed_memory  # noqa: E402
from captioner.utils.hardware import benchmark_precisions, machine_info, machine_line  # noqa: E402

BATCH, GRID, ENC, DIM, VOCAB = 64, 7, 512, 512, 5000


def median_time(fn, repeats: int, warmup: int = 2, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(device, dtype, repeats, n=2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = median_time(lambda: a @ b, repeats, sync=_sync(device))
    return 2 * n**3 / sec / 1e9


def _sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def make_batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 21, (BATCH,), generator=g)  # 10-20 words
    T = int(words.max()) + 2
    caps = torch.full((BATCH, T), PAD, dtype=torch.long)
    for i, n in enumerate(words.tolist()):
        caps[i, 0] = BOS
        caps[i, 1 : n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
        caps[i, n + 1] = EOS
    feats = torch.randn(BATCH, GRID * GRID, ENC, generator=g)
    return feats.to(device), caps.to(device), (words + 2).to(device)


def lstm_step_flops(words: torch.Tensor) -> float:
    """Useful FLOPs of one training step (x3: forward, and backward's two matmuls per forward
    one). Per decoded position (one per word + EOS): LSTM gates 2(E+C+H)4H, attention query
    projection 2HA, context gate f_beta 2HC, scores and read-out 2R(A+C), vocabulary 2HV. Per
    image: the grid's key projection 2RCA and init_h/init_c 2*2CH."""
    E = C = H = A = DIM
    R, V = GRID * GRID, VOCAB
    per_pos = 2 * (E + C + H) * 4 * H + 2 * H * A + 2 * H * C + 2 * R * (A + C) + 2 * H * V
    per_img = 2 * R * C * A + 4 * C * H
    positions = float((words + 1).sum())
    return 3 * (positions * per_pos + BATCH * per_img)


def transformer_step_flops(words: torch.Tensor, layers: int = 3, ff: int = 1024) -> float:
    """Useful FLOPs of one Transformer training step (x3 as above), counting real positions only
    (n = words + EOS per caption; padding is not useful work). Per position and layer: self-
    attention q/k/v/o 8d^2, cross-attention q/o 4d^2, feed-forward 4 d ff, cross scores and
    read-out 4Rd; causal self-attention scores and read-out 4(t+1)d at position t. Per image and
    layer: cross-attention k/v of the R regions 4Rd^2; per image: the grid projection 2RCd; per
    position: the vocabulary 2dV."""
    d, C, R, V = DIM, ENC, GRID * GRID, VOCAB
    n = (words + 1).double()
    positions, causal = float(n.sum()), float((n * (n + 1) / 2).sum())
    per_pos = layers * (8 * d * d + 4 * d * d + 4 * d * ff + 4 * R * d) + 2 * d * V
    per_img = layers * 4 * R * d * d + 2 * R * C * d
    return 3 * (positions * per_pos + causal * layers * 4 * d + BATCH * per_img)


def train_steps(device, repeats, transformer=False, compile_=False, precisions=("fp32",)):
    feats, caps, lengths = make_batch(device)
    words = lengths - 2
    flops = lstm_step_flops(words.cpu())
    torch.manual_seed(0)
    ours = LSTMDecoder(VOCAB, ENC, embed_dim=DIM, hidden_size=DIM, attention_dim=DIM,
                       dropout=0.5, pad_id=PAD).to(device).train()  # fmt: skip
    tut = TutorialDecoder(VOCAB, ENC, DIM, DIM, DIM).to(device).train()

    def teacher_forced_loss(model):  # ours and the Transformer: one forward over all steps
        logits, _ = model(feats, caps[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), caps[:, 1:].reshape(-1),
                               ignore_index=PAD)  # fmt: skip

    def tutorial_loss(model):
        preds, targets, dl, _ = model(feats, caps, lengths)
        mask = torch.arange(preds.size(1), device=device)[None] < torch.tensor(dl, device=device)[:, None]
        return F.cross_entropy(preds[mask].float(), targets[:, : preds.size(1)][mask])

    models = {"ours (LSTMDecoder)": (ours, teacher_forced_loss), "tutorial re-impl.": (tut, tutorial_loss)}
    if transformer:
        from captioner.models.transformer_decoder import TransformerDecoder

        tr = TransformerDecoder(VOCAB, ENC, d_model=DIM, num_layers=3).to(device).train()
        models["transformer (3x512)"] = (tr, teacher_forced_loss)
    if compile_:  # train.py compile=true: a compiled twin of each of our models, same weights
        for name in [n for n in models if not n.startswith("tutorial")]:
            twin = copy.deepcopy(models[name][0])
            twin.compile()
            models[name.split(" ")[0] + " compiled"] = (twin, teacher_forced_loss)

    rows = []
    for precision in precisions:
        for name, (model, loss_fn) in models.items():
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            ctx = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext()
            )

            def step(model=model, loss_fn=loss_fn, opt=opt, ctx=ctx):
                opt.zero_grad(set_to_none=True)
                with ctx:
                    loss = loss_fn(model)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            step()  # compiled models compile here (once per precision), outside the timing
            first = time.perf_counter() - t0
            sec = median_time(step, repeats, sync=_sync(device))
            is_tr = name.startswith("transformer")
            useful = transformer_step_flops(words.cpu()) if is_tr else flops
            rows.append({"model": name, "precision": precision, "seconds": sec,
                         "images_per_s": BATCH / sec, "useful_gflop": useful / 1e9,
                         "first_step_s": first})  # fmt: skip
    return rows, flops, float(words.float().mean())


def decode_rows(device, repeats, images):
    torch.manual_seed(0)
    decoder = build_decoder(VOCAB, ENC, DIM).to(device).eval()
    name = type(decoder).__name__
    feats = torch.randn(images, GRID * GRID, ENC, device=device)
    common = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD, "max_length": 20}
    rows = []
    with torch.inference_mode():
        for label, fn in (
            ("greedy", lambda: greedy_search(decoder, feats, **common)),
            ("beam 5", lambda: beam_search(decoder, feats, beam_size=5, **common)),
        ):
            sec = median_time(fn, repeats, warmup=1, sync=_sync(device))
            rows.append({"method": label, "images": images, "seconds": sec,
                         "captions_per_s": images / sec})  # fmt: skip
    return rows, name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-images", type=int, default=256)
    p.add_argument("--transformer", action="store_true", help="also the Transformer decoder")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile'd twins of our decoders (train.py compile=true); "
                        "each compiles for a minute or two")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, plus bf16 where the CPU runs it natively")
    p.add_argument("--out", default="bench_results/bench.json")
    args = p.parse_args()
    precisions = benchmark_precisions(args.precision)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py / evaluate.py do
    device = torch.device(args.device)
    info = machine_info()
    print(machine_line(info), flush=True)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    gflops = {p: matmul_gflops(device, dtypes[p], args.repeats) for p in precisions}
    train, flops, mean_words = train_steps(device, args.repeats, args.transformer, args.compile,
                                           precisions)
    for r in train:  # each model against its own useful FLOPs
        useful = r["useful_gflop"] * 1e9
        r["fraction_of_bound"] = useful / r["seconds"] / (gflops[r["precision"]] * 1e9)
        r["bound_images_per_s"] = gflops[r["precision"]] * 1e9 / useful * BATCH
    base = {r["precision"]: r["seconds"] for r in train if r["model"].startswith("tutorial")}
    for r in train:
        r["speedup_vs_tutorial"] = base[r["precision"]] / r["seconds"]
    dec, dec_name = decode_rows(device, max(3, args.repeats // 2), args.decode_images)

    print(f"{date.today()}  device {device}  threads {args.threads}")
    print("matmul 2048^3: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in gflops.items()))
    print(f"training step: batch {BATCH}, mean {mean_words:.1f} words, useful GFLOP per step "
          f"(fwd+bwd): " + ", ".join(sorted({f"{r['model']} {r['useful_gflop']:.1f}" for r in train})))
    print(f"{'model':<22}{'prec':<6}{'ms/step':>9}{'images/s':>10}{'vs tut.':>9}"
          f"{'of bound':>10}{'bound img/s':>13}{'1st step s':>12}")  # fmt: skip
    for r in train:
        frac, bound = f"{r['fraction_of_bound']:.0%}", f"{r['bound_images_per_s']:.0f}"
        print(f"{r['model']:<22}{r['precision']:<6}{r['seconds'] * 1e3:>9.0f}"
              f"{r['images_per_s']:>10.1f}{r['speedup_vs_tutorial']:>8.2f}x{frac:>10}{bound:>13}"
              f"{r['first_step_s']:>12.1f}")  # fmt: skip
    print(f"decoding ({dec_name}, fp32, max_length 20, batched):")
    for r in dec:
        print(f"  {r['method']:<8}{r['images']:>5} images {r['seconds']:>7.2f} s "
              f"{r['captions_per_s']:>8.1f} captions/s")  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": str(date.today()), "device": str(device), "threads": args.threads, **info,
            "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "repeats": args.repeats, "batch": BATCH,
            "vocab": VOCAB, "dim": DIM, "grid": f"{GRID}x{GRID}x{ENC}",
            "mean_words": mean_words, "useful_flops_per_step": flops}  # fmt: skip
    out.write_text(json.dumps({"config": meta, "matmul_gflops": gflops, "train": train,
                               "decode": dec}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
