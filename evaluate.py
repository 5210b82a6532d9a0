"""Thin shim: see captioner/cli/evaluate.py."""
from captioner.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
