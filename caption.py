"""Thin shim: see captioner/cli/caption.py."""
from captioner.cli.caption import main

if __name__ == "__main__":
    raise SystemExit(main())
