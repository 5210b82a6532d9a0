"""Hydra glue shared by the CLIs: the config directory, the run-directory resolvers and the
turning of bad input into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from pathlib import Path

from omegaconf import OmegaConf

# configs/ lives beside the package in the repository (and in an editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
EXIT_BAD_INPUT = 2


def newest_run_checkpoint(task_dir, pattern: str = str(LAST_CHECKPOINT)) -> Path | None:
    """The newest ``<run>/<pattern>`` (default ``checkpoints/last.ckpt``) under a task's log dir
    (``outputs/train``: single runs and multirun jobs), by modification time; None if none."""
    found = [p for p in Path(task_dir).glob(f"**/{pattern}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_dir(ckpt_path, task_dir: str, fresh_dir: str) -> str:
    """``hydra.run.dir`` of a training run. Resuming continues in the run directory the
    checkpoint belongs to, so logs, checkpoints and the best-model record stay together:
    ``last`` = the newest run under ``task_dir``; an explicit ``<run>/checkpoints/x.ckpt`` = that
    ``<run>``. Anything else (no checkpoint, a checkpoint outside a run directory, ``last`` with
    no earlier run: the training script then reports it) gets ``fresh_dir``."""
    if ckpt_path is None:
        return fresh_dir
    if str(ckpt_path) == "last":
        found = newest_run_checkpoint(task_dir)
        return str(found.parents[1]) if found else fresh_dir
    path = Path(str(ckpt_path))
    if path.parent.name == LAST_CHECKPOINT.parent.name and path.is_file():
        return str(path.parents[1])
    return fresh_dir


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("uid"):
        # Cached per config (Hydra copies the cache into each multirun job's config, so all jobs
        # share one sweep dir). pid: distinct for processes alive at the same time on one host;
        # 16 random bits: apart across hosts sharing a file system.
        OmegaConf.register_new_resolver("uid", lambda: f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}", use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        # cached: the run dir must not move once training writes its own last.ckpt
        OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True)


@contextlib.contextmanager
def exit_on_bad_input(log: logging.Logger):
    """Bad input (``InputError``: data, images, checkpoints) and configs that do not instantiate
    (unknown keys reach constructors as unexpected arguments) -> one line on stderr and in the
    run's log, exit status 2. ``HYDRA_FULL_ERROR=1`` keeps the traceback."""
    from hydra.errors import InstantiationException

    from captioner.utils.errors import InputError

    try:
        yield
    except (InputError, InstantiationException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(e).split())  # hydra's messages span lines
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
