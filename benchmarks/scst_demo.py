"""Cross-entropy training, then self-critical training (experiment=scst_demo) on the embedded
data; prints validation CIDEr-D of both stages' best checkpoints, decoded the same way.

    python benchmarks/scst_demo.py [--ce-epochs 6] [--scst-epochs 3] [--num-train 1000]
    python benchmarks/scst_demo.py --bench-precision   # fp32 vs bf16-mixed training speed

A reduced training split (``--num-train``) keeps it to minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(out: Path, *overrides: str) -> Path:
    args = [sys.executable, "train.py", f"hydra.run.dir={out}", "~logger.tensorboard",
            "callbacks.progress_bar.refresh_rate=0", *overrides]
    print("+", " ".join(args[1:]), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)
    return out / "checkpoints" / "best.ckpt"


@torch.no_grad()
def val_cider(ckpt: Path, data_overrides: list[str], **decode) -> float:
    """CIDEr-D (0-10) of a checkpoint's captions of the validation split."""
    from hydra.utils import instantiate

    from captioner.checkpoint import load_checkpoint
    from captioner.data.tokenizer import decode as decode_ids
    from captioner.metrics.cider import cider_d
    from captioner.metrics.text import tokenize
    from captioner.utils.hydra import compose_config

    cfg = compose_config("train", ["experiment=demo", *data_overrides], ckpt.parents[1])
    model, tokenizer, _ = load_checkpoint(ckpt)
    dm = instantiate(cfg.data, num_workers=0)
    dm.set_tokenizer(tokenizer)
    hyps = {}
    for batch in dm.dataloader("val"):
        tokens, _ = model.generate(batch["images"], **decode)
        for i, row in zip(batch["image_ids"].tolist(), tokens.tolist()):
            hyps[i] = tokenize(decode_ids(tokenizer, row))
    refs = {i: [tokenize(c) for c in caps] for i, caps in dm.references("val").items()}
    return cider_d(refs, hyps)[0]


def bench_precision(steps: int, repeats: int) -> None:
    """Training steps (forward, backward, Adam) of the demo model on one synthetic batch in
    float32 and in bf16 autocast (what Lightning's precision=bf16-mixed runs), interleaved so
    that background load hits both alike."""
    import tempfile

    from omegaconf import OmegaConf

    from captioner.checkpoint import build_model
    from captioner.utils.hydra import compose_config

    cfg = compose_config("train", ["experiment=demo"], tempfile.mkdtemp())
    V = 40
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.update(vocab_size=V, pad_id=0, bos_id=1, eos_id=2)
    torch.manual_seed(0)
    model = build_model(model_config).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    B, k, T = 32, 5, 14  # demo batch: 32 images of 64x64, 5 captions each
    images = torch.randn(B, 3, 64, 64)
    tokens = torch.randint(3, V, (B * k, T))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = model.encode(images)  # (B, R, C)
            logits, _ = model.decoder(features, tokens[:, :-1])  # (B*k, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {False: [], True: []}
    for bf16 in (False, True):  # warm-up
        step(bf16)
    for _ in range(repeats):
        for bf16 in (False, True):
            start = time.perf_counter()
            for _ in range(steps):
                step(bf16)
            times[bf16].append((time.perf_counter() - start) / steps)
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}x{k} captions")
    print(f"fp32        {fp32 * 1000:7.1f} ms/step (median of {repeats} x {steps} steps)")
    print(f"bf16-mixed  {bf16 * 1000:7.1f} ms/step")
    print(f"bf16 / fp32 time ratio {bf16 / fp32:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ce-epochs", type=int, default=6)
    p.add_argument("--scst-epochs", type=int, default=3)
    p.add_argument("--num-train", type=int, default=1000, help="training images of the embedded set")
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--baseline", default="greedy", choices=["greedy", "mean"])
    p.add_argument("--out", type=Path, help="default: outputs/scst_demo/<time>")
    p.add_argument("--bench-precision", action="store_true")
    p.add_argument("--bench-steps", type=int, default=3)
    p.add_argument("--bench-repeats", type=int, default=5)
    args = p.parse_args()
    if args.bench_precision:
        bench_precision(args.bench_steps, args.bench_repeats)
        return

    out = args.out or ROOT / "outputs" / "scst_demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    if out.exists():  # a stage would find the older run's checkpoints there
        sys.exit(f"error: {out} exists; runs never overwrite each other")
    # its own root: a differently sized set must not replace the default one in data/synthetic
    data = [f"data.root=data/synthetic_{args.num_train}_{args.num_val}",
            f"data.synthetic.num_train={args.num_train}", f"data.synthetic.num_val={args.num_val}",
            f"data.synthetic.num_test={args.num_val}"]
    common = [*data, "test=false", "~callbacks.early_stopping"]
    start = time.time()
    xe = train(out / "xe", "experiment=demo", f"trainer.max_epochs={args.ce_epochs}", *common)
    xe_time = time.time() - start
    scst = train(out / "scst", "experiment=scst_demo", f"init_from={xe}",
                 f"trainer.max_epochs={args.scst_epochs}", f"loss.scst.baseline={args.baseline}",
                 *common)
    scst_time = time.time() - start - xe_time

    print(f"\ncross-entropy {args.ce_epochs} epochs {xe_time:.0f} s, self-critical "
          f"({args.baseline} baseline) {args.scst_epochs} epochs {scst_time:.0f} s, "
          f"{args.num_train} training images")
    print(f"validation CIDEr-D (0-10) on {args.num_val} images   cross-entropy   self-critical")
    # bf16 like the demo's own validation (trainer.precision=bf16-mixed): float32 decoding of a
    # bf16-trained model picks some different words, and the logged val/cider would not match
    for name, decode in [("greedy", {"method": "greedy", "max_length": 20, "precision": "bf16"}),
                         ("beam 3", {"method": "beam", "beam_size": 3, "max_length": 20,
                                     "precision": "bf16"})]:
        before, after = val_cider(xe, data, **decode), val_cider(scst, data, **decode)
        print(f"  {name:8s}{'':35s}{before:8.3f}        {after:8.3f}")


if __name__ == "__main__":
    main()
