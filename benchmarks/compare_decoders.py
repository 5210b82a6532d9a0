"""Train each decoder variant for the same number of epochs on the embedded set and compare.

    python benchmarks/compare_decoders.py [--epochs 2] [--variants lstm_additive transformer]
                                       [--threads 2] [--out DIR] [KEY=VALUE ...]

Variants (the experiment presets, demo-sized: ResNet-18 cut after layer3, 64x64 images):
    lstm_additive           experiment=lstm_attention
    lstm_multihead          experiment=lstm_attention, multihead attention with 4 heads
    lstm_coattention_gated  experiment=lstm_attention, fusion=coattention+gated
    transformer             experiment=transformer
Extra KEY=VALUE Hydra overrides apply to every variant (e.g. trainer.limit_train_batches=50).

Each run goes through ``captioner.cli.train.run`` (fit, then test of the best checkpoint with
the config's ``decode`` settings: beam 3). Train images/s is measured separately on the trained
model: forward + backward + Adam step on one training batch (images x 5 captions), timed over
``--steps`` steps after 2 warm-up steps, data loading excluded. Writes
``<out>/compare_decoders.json`` and ``<out>/compare_decoders.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.utils.cpu import keep_freed_memory
from captioner.utils.io import atomic_write_bytes, atomic_write_json

VARIANTS = {
    "lstm_additive": ["experiment=lstm_attention"],
    "lstm_multihead": ["experiment=lstm_attention", "model.decoder.attention=multihead",
                       "model.decoder.num_heads=4"],
    "lstm_coattention_gated": ["experiment=lstm_attention", "model.decoder.fusion=coattention+gated"],
    "transformer": ["experiment=transformer"],
}


def compose(overrides: list[str], output_dir: Path):
    """The train config as the CLI composes it, with the run directory set."""
    from captioner.utils.hydra import compose_config

    return compose_config("train", overrides, output_dir)


def train_throughput(model, batch: dict, pad_id: int, steps: int) -> float:
    """Training images per second: forward + backward + Adam on one batch, no data loading."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, captions = batch["images"], batch["captions"]  # (B, 3, S, S), (B, k, T)
    B, k, T = captions.shape
    tokens = captions.view(B * k, T)

    def one_step():
        logits, _ = model(images, tokens[:, :-1])  # (B*k, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                               ignore_index=pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return B * steps / (time.perf_counter() - start)


def run_variant(name: str, overrides: list[str], args, out: Path) -> dict:
    from hydra.utils import instantiate

    from captioner.checkpoint import load_checkpoint
    from captioner.cli.train import run

    run_dir = out / name
    cfg = compose([*VARIANTS[name], f"trainer.max_epochs={args.epochs}", "trainer.min_epochs=1",
                   "~logger", "~callbacks.early_stopping", *overrides], run_dir)
    start = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - start
    model, tokenizer, _ = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    ips = train_throughput(model, batch, tokenizer.pad_token_id, args.steps)
    return {
        "variant": name,
        "overrides": [*VARIANTS[name], *overrides],
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_s": ips,
        "wall_s": wall,
        "epochs": args.epochs,
        "test_bleu4": metrics.get("test/bleu4"),
        "test_cider": metrics.get("test/cider"),
        "val_cider": metrics.get("val/cider"),
    }


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| variant | parameters | train images/s | BLEU-4 (test) | CIDEr-D (test) | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['parameters'] / 1e6:.2f}M | {r['train_images_per_s']:.0f} "
                     f"| {r['test_bleu4']:.3f} | {r['test_cider']:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="timed training steps for images/s")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None,
                   help="default: outputs/compare_decoders/<date>_<time> (never an earlier run's)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as train.py / evaluate.py do
    if args.out is None:
        args.out = Path("outputs/compare_decoders") / time.strftime("%Y-%m-%d_%H-%M-%S")
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.variants:
        rows.append(run_variant(name, args.overrides, args, args.out))
        print(json.dumps(rows[-1]), flush=True)
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or
           platform.machine(), "epochs": args.epochs, "overrides": args.overrides}
    atomic_write_json(args.out / "compare_decoders.json", {"env": env, "rows": rows})
    header = (f"Embedded set, {args.epochs} epoch(s) each, {args.threads} CPU thread(s), torch "
              f"{torch.__version__}; test = beam 3 on the best checkpoint (val CIDEr-D).")
    if args.overrides:
        header += f" Overrides: `{' '.join(args.overrides)}`."
    table = markdown(rows, header)
    atomic_write_bytes(args.out / "compare_decoders.md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
