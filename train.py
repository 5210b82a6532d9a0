"""Thin shim: see captioner/cli/train.py."""
from captioner.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
