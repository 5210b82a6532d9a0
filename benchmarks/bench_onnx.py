"""Captions per second: ONNX Runtime vs PyTorch, end to end (encoder + search), side by side.

    python benchmarks/bench_onnx.py [--checkpoint PATH] [--decoders lstm transformer]
                                    [--batches 1 32] [--images 32] [--threads 2] [--rounds 3]

Without ``--checkpoint`` each decoder is the ``make demo`` architecture with random weights
(ResNet-18 cut after layer2 on 48-pixel images: a 6x6x128 grid; LSTM-attention 128/256/128, or
the Transformer decoder's default config: d_model 256, 3 layers, 8 heads), vocabulary 1,000. An
untrained decoder rarely emits EOS, so every caption runs to ``--max-length``: identical work for
both engines. The model is exported (``captioner.export``) and the same images are captioned by
``Captioner.generate`` and by ``onnx_runtime.load(DIR).generate`` - the same search from
``captioner.models.search`` over both - greedy and beam 3, at each batch size.

The two engines are timed in interleaved rounds (PyTorch, then ONNX Runtime, per round) so drift
in the machine's speed (other tenants) hits both alike; the table gives each one's median round
and the ratio of the medians. Captions are compared between the engines.
Writes ``bench_results/onnx.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from captioner.checkpoint import build_model, load_checkpoint
from captioner.data.tokenizer import train_tokenizer
from captioner.export.onnx_export import OPSET, export_model
from captioner.export.onnx_runtime import load
from captioner.utils.cpu import keep_freed_memory
from captioner.utils.hardware import machine_info, machine_line

ENCODER = {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
           "return_layer": "layer2"}
DECODERS = {
    "lstm": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
             "embed_dim": 128, "hidden_size": 256, "attention_dim": 128},
    "transformer": {"_target_": "captioner.models.transformer_decoder.TransformerDecoder",
                    "_partial_": True, "d_model": 256, "num_layers": 3, "num_heads": 8,
                    "ff_dim": 1024},
}
VOCAB, IMAGE_SIZE = 1000, 48


def random_model(decoder: str):
    """(model, tokenizer, image size) of the demo architecture with random weights."""
    tok = train_tokenizer([" ".join(f"w{i}" for i in range(VOCAB - 4))])  # + 4 special tokens
    config = {"_target_": "captioner.models.captioner.Captioner", "vocab_size": len(tok),
              "pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id,
              "encoder": ENCODER, "decoder": DECODERS[decoder]}
    torch.manual_seed(0)
    return build_model(config).eval(), tok, IMAGE_SIZE


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def caption_all(model, images, batch, decode):
    """Token rows of every image, ``batch`` images per ``generate`` call."""
    rows = []
    for start in range(0, images.size(0), batch):
        tokens, _ = model.generate(images[start : start + batch], **decode)
        rows += tokens.tolist()
    return rows


def bench(name, model, onnx, image_size, args) -> list[dict]:
    rows = []
    decodes = {"greedy": {"method": "greedy"}, "beam 3": {"method": "beam", "beam_size": 3}}
    for batch in args.batches:
        n = args.images
        images = torch.randn(n, 3, image_size, image_size)  # (n, 3, S, S)
        for label, decode in decodes.items():
            decode = {**decode, "max_length": args.max_length, "precision": "fp32"}
            caption_all(model, images[:batch], batch, decode)  # warm-up: first-call allocations
            caption_all(onnx, images[:batch], batch, decode)
            pt, ort, same = [], [], 0
            for _ in range(args.rounds):
                sec, want = timed(caption_all, model, images, batch, decode)
                pt.append(sec)
                sec, got = timed(caption_all, onnx, images, batch, decode)
                ort.append(sec)
                same = sum(a == b for a, b in zip(want, got))
            r = {"model": name, "search": label, "batch": batch, "images": n,
                 "torch_seconds": pt, "onnxruntime_seconds": ort,
                 "torch_captions_per_s": n / statistics.median(pt),
                 "onnxruntime_captions_per_s": n / statistics.median(ort),
                 "same_captions": f"{same}/{n}"}
            r["ratio"] = r["onnxruntime_captions_per_s"] / r["torch_captions_per_s"]
            rows.append(r)
            print(f"{name:<12}{label:<8}{batch:>6}{r['torch_captions_per_s']:>14.1f}"
                  f"{r['onnxruntime_captions_per_s']:>14.1f}{r['ratio']:>8.2f}x  {r['same_captions']}",
                  flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path, default=None, help="a trained checkpoint instead")
    p.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--images", type=int, default=32,
                   help="images captioned per timed round, in generate calls of each batch size")
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench_results/onnx.json")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as caption.py does
    info = machine_info()
    print(machine_line(info))
    print(f"torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, opset {OPSET}, threads {args.threads}, "
          f"max_length {args.max_length}, fp32", flush=True)
    if args.checkpoint:
        model, tok, payload = load_checkpoint(args.checkpoint)
        models = {args.checkpoint.name: (model, tok, payload["image_size"])}
    else:
        models = {d: random_model(d) for d in args.decoders}

    print(f"{'model':<12}{'search':<8}{'batch':>6}{'torch cap/s':>14}{'ORT cap/s':>14}{'ORT/pt':>9}  same")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, tok, size) in models.items():
            export_model(model, tok, {}, size, Path(tmp) / name)
            onnx = load(Path(tmp) / name, threads=args.threads)
            rows += bench(name, model, onnx, size, args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**info, "onnxruntime": onnxruntime.__version__, "opset": OPSET,
            "threads": args.threads, "max_length": args.max_length, "rounds": args.rounds,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    out.write_text(json.dumps({"config": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
