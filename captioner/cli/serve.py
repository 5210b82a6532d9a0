"""captioner-serve --checkpoint PATH [--checkpoint PATH ...] | --onnx DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] ..."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from captioner.cli.caption import positive_int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serve.py", description="Serve a trained checkpoint over HTTP: POST /caption "
        "(batched), GET /health, GET /info, the web page at /, the API docs at /docs.")
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help="checkpoint (default: best of the newest run under outputs/train); "
                        "more than once: one ensemble (the search averages their log-probs)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="an ONNX export directory (captioner-export) instead of a checkpoint; "
                        "runs on the CPU with ONNX Runtime")
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"],
                   help="127.0.0.1: this machine only (default); 0.0.0.0 / ::: every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=positive_int, default=16,
                   help="requests captioned in one batched search (1: batching off)")
    p.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long a batch waits to fill once its first request is there")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: the usable cores less those busy elsewhere)")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a request may wait in the queue before a 504")
    p.add_argument("--max-pending", type=positive_int, default=256,
                   help="concurrent connections; more are answered 503 (bounds memory with "
                        "--max-body-mb)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                   help="largest photo (width x height), checked before decoding")
    p.add_argument("--max-frames", type=positive_int, default=100,
                   help="animations with more frames are refused")
    p.add_argument("--max-beam-size", type=positive_int, default=10)
    p.add_argument("--max-length", type=positive_int, default=50,
                   help="largest max_length a request may ask for")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    if args.onnx is not None and args.checkpoint is not None:
        p.error("--onnx and --checkpoint exclude each other")
    if args.onnx is not None and args.accelerator == "cuda":
        p.error("--onnx runs on the CPU: --accelerator cuda does not apply")
    return args


def port_free(host: str, port: int) -> str | None:
    """None, or why ``host:port`` cannot be listened on (checked before the model loads)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror}"
    return None


MAIN_PID = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != MAIN_PID:  # a forked HTTP process inherits this: default behaviour there
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 1024 <= args.port <= 65535:  # LitServe's own range
        print(f"error: --port {args.port}: must be from 1024 to 65535", file=sys.stderr)
        return 2
    if args.max_body_mb <= 0 or args.batch_timeout_ms < 0 or args.timeout <= 0:
        print("error: --max-body-mb and --timeout must be > 0, --batch-timeout-ms >= 0",
              file=sys.stderr)
        return 2
    problem = port_free(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from captioner.cli.caption import newest_checkpoint
    from captioner.serve.api import Limits
    from captioner.serve.app import ServeConfig, build_server
    from captioner.serve.model import load_caption_model
    from captioner.utils.errors import InputError

    try:
        checkpoint = args.onnx or args.checkpoint or newest_checkpoint()
        checkpoint = ([str(c) for c in checkpoint] if isinstance(checkpoint, list)
                      else str(checkpoint))
        # loaded here once, so a bad checkpoint stops the server with one line before any
        # worker starts; the worker process loads its own copy
        info = load_caption_model(checkpoint, "cpu").info
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    limits = Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_pixels=args.max_pixels,
                    max_frames=args.max_frames, max_beam_size=args.max_beam_size,
                    max_length=args.max_length)
    config = ServeConfig(checkpoint, max_batch_size=args.max_batch_size,
                         batch_timeout_ms=args.batch_timeout_ms, threads=args.threads,
                         accelerator="cpu" if args.onnx else args.accelerator, timeout_s=args.timeout, limits=limits)
    server = build_server(config, info)
    # LitServe shuts its worker processes down on KeyboardInterrupt; a plain SIGTERM (kill,
    # systemd, docker stop) would end this process alone and orphan them
    signal.signal(signal.SIGTERM, _interrupt)
    what = info["name"] if isinstance(checkpoint, list) else checkpoint  # an ensemble: its names
    print(f"serving {what} at http://{args.host}:{args.port}/ (API docs: /docs)",
          file=sys.stderr, flush=True)
    # one HTTP process: the cores go to the inference worker
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level=args.log_level,
               generate_client_file=False, api_server_worker_type="process",
               limit_concurrency=args.max_pending)
    return 0


if __name__ == "__main__":
    sys.exit(main())
