"""Thin shim: see captioner/cli/serve.py."""
from captioner.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
