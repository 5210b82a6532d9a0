"""python caption.py image.jpg [more.jpg ...] [--checkpoint PATH ... | --onnx DIR] [--beam-size K]

``--checkpoint`` given more than once: the checkpoints caption as one ensemble."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RUNS = Path("outputs/train")


def newest_checkpoint(runs: Path = DEFAULT_RUNS) -> Path:
    """The best checkpoint of the newest run under outputs/train (single and multi runs)."""
    from captioner.checkpoint import CheckpointError
    from captioner.utils.hydra import newest_run_checkpoint

    found = newest_run_checkpoint(runs, "checkpoints/best*.ckpt")
    if found is None:
        raise CheckpointError(
            f"no checkpoint found under {runs}/ (train one with `python train.py`, "
            "or pass --checkpoint PATH)"
        )
    return found


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "integer >= 1"  # argparse names the type in its message


def load_onnx(directory: Path, threads: int | None):
    """An export directory as (model, tokenizer, payload), like ``load_checkpoint``."""
    from captioner.export.onnx_runtime import load

    model = load(directory, threads)
    return model, model.tokenizer, {"decode": model.decode, "image_size": model.image_size,
                                    "preprocess": model.preprocess}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caption.py", description="Caption images with a trained checkpoint.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help="checkpoint (default: best of the newest run under outputs/train); "
                        "more than once: an ensemble (the search averages their log-probs)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="an ONNX export directory (captioner-export) instead of a checkpoint")
    p.add_argument("--beam-size", type=positive_int, default=None, help="1 = greedy (default: checkpoint's)")
    p.add_argument("--max-length", type=positive_int, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                   help="default: the checkpoint's, else auto (bf16 only where the hardware "
                        "runs it natively)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the usable cores less those busy elsewhere)")
    p.add_argument("--attention", type=Path, default=None,
                   help="write a picture of the attention per word (one image only)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    args = p.parse_args(argv)
    if args.onnx is not None and args.checkpoint is not None:
        p.error("--onnx and --checkpoint exclude each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from captioner.checkpoint import load_checkpoints
    from captioner.inference import caption_files, decode_settings
    from captioner.utils.cpu import keep_freed_memory
    from captioner.utils.errors import InputError
    from captioner.utils.hardware import set_threads

    keep_freed_memory()
    set_threads(args.threads)

    try:
        if args.onnx is not None:
            model, tokenizer, payload = load_onnx(args.onnx, args.threads)
        else:
            model, tokenizer, payload = load_checkpoints(args.checkpoint or [newest_checkpoint()])
        decode = decode_settings(payload["decode"])
        if args.beam_size is not None:
            decode.update(method="greedy" if args.beam_size == 1 else "beam", beam_size=args.beam_size)
        if args.max_length is not None:
            decode["max_length"] = args.max_length
        if args.precision is not None:
            decode["precision"] = args.precision
        results = caption_files(model, tokenizer, args.images, payload["image_size"], decode,
                                args.batch_size, preprocess=payload.get("preprocess"))
    except InputError as e:  # bad checkpoint or export: one line naming it, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:  # every readable image is captioned; each bad one gets its own line
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}\t{r['caption']}")
    captioned = [r for r in results if "error" not in r]
    if args.attention is not None and captioned:
        from captioner.viz.attention import save_attention_figure

        save_attention_figure(captioned[0], args.attention)
        print(f"attention picture: {args.attention}", file=sys.stderr)
    return 2 if len(captioned) < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
