"""captioner-export --checkpoint PATH --out DIR [--opset N]: a checkpoint -> ONNX graphs, the
tokenizer and a config that ``caption.py --onnx DIR`` and ``captioner.export.onnx_runtime.load``
read (``captioner/export/onnx_export.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from captioner.export.onnx_export import OPSET

    p = argparse.ArgumentParser(prog="captioner-export",
                                description="Export a trained checkpoint to ONNX.")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint file (.ckpt)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the export into")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from captioner.export.onnx_export import export_checkpoint
    from captioner.utils.errors import InputError

    try:
        config = export_checkpoint(args.checkpoint, args.out, args.opset)
    except InputError as e:  # bad checkpoint, unsupported part, opset: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {config['decoder']['class']} exported at opset {config['opset']} "
          f"({', '.join(config['files'].values())}, config.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
