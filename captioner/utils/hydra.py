"""Hydra glue shared by the CLIs: the config directory, the run-directory resolvers and the
turning of bad input into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from captioner.utils.errors import InputError

# configs/ lives beside the package in the repository (and in an editable install).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
EXIT_BAD_INPUT = 2


def newest_run_checkpoint(task_dir, pattern: str = str(LAST_CHECKPOINT)) -> Path | None:
    """The newest ``<run>/<pattern>`` (default ``checkpoints/last.ckpt``) under a task's log dir
    (``outputs/train``: single runs and multirun jobs), by modification time; None if none."""
    found = [p for p in Path(task_dir).glob(f"**/{pattern}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class AmbiguousResume(InputError):
    """``ckpt_path=last`` where the run to continue is not clear; the message names the runs."""


def _runs(task_dir: Path) -> dict[Path, float]:
    """{run directory: time of its latest start or checkpoint} under a task's log dir."""
    starts = [p.parent.parent if p.parent.name == ".hydra" else p.parents[2]
              for p in task_dir.glob("**/.hydra/**/config.yaml")]
    ckpts = [p.parents[1] for p in task_dir.glob(f"**/{LAST_CHECKPOINT}") if p.is_file()]
    runs: dict[Path, float] = {}
    for run in set(starts) | set(ckpts):
        times = [p.stat().st_mtime for p in [*run.glob(".hydra/**/config.yaml"), run / LAST_CHECKPOINT]
                 if p.is_file()]
        runs[run] = max(times)
    return runs


def run_to_resume(task_dir) -> Path | None:
    """The run that ``ckpt_path=last`` continues: the most recently active run under
    ``task_dir`` (started, resumed or checkpointed last), if it has a ``last.ckpt``; None when no
    run has one. ``AmbiguousResume`` when that run has no checkpoint while older ones do (it
    stopped before its first epoch ended: resuming an older run instead would be a guess) or when
    several jobs of the newest multirun have one."""
    runs = _runs(Path(task_dir))
    resumable = sorted((r for r in runs if (r / LAST_CHECKPOINT).is_file()), key=runs.get)
    if not resumable:
        return None
    newest = max(runs, key=runs.get)
    if newest not in resumable:
        raise AmbiguousResume(
            f"ckpt_path=last: the newest run {newest} has no {LAST_CHECKPOINT} (stopped before "
            f"its first epoch ended); older runs have one: {', '.join(map(str, resumable[-3:]))}; "
            f"pass ckpt_path=<run>/{LAST_CHECKPOINT} to choose")
    jobs = [r for r in resumable if r.parent == newest.parent and r.parent.parent.name == "multiruns"]
    if len(jobs) > 1:
        raise AmbiguousResume(
            f"ckpt_path=last: the newest runs are jobs of one multirun: "
            f"{', '.join(map(str, jobs))}; pass ckpt_path=<run>/{LAST_CHECKPOINT} to choose")
    return newest


def run_dir(ckpt_path, task_dir: str, fresh_dir: str) -> str:
    """``hydra.run.dir`` of a training run. Resuming continues in the run directory the
    checkpoint belongs to, so logs, checkpoints and the best-model record stay together:
    ``last`` = ``run_to_resume``; an explicit ``<run>/checkpoints/x.ckpt`` = that ``<run>``.
    Anything else (no checkpoint, a checkpoint outside a run directory, ``last`` with no run or
    an ambiguous one: the training script then reports it) gets ``fresh_dir``."""
    if ckpt_path is None:
        return fresh_dir
    if str(ckpt_path) == "last":
        try:
            found = run_to_resume(task_dir)
        except AmbiguousResume:
            return fresh_dir
        return str(found) if found else fresh_dir
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


_task_started = False  # set once a task function runs: later exits are the task's own


def exit_2_on_config_errors(hydra_main):
    """Wrap a ``@hydra.main`` function so that errors Hydra reports before the task function runs
    (unknown keys, bad override syntax, unknown config group options), which Hydra ends with
    status 1, end with ``EXIT_BAD_INPUT`` like every other bad input. A failure inside the task
    keeps its own status."""

    @functools.wraps(hydra_main)
    def main(*args, **kwargs):
        try:
            return hydra_main(*args, **kwargs)
        except SystemExit as e:
            if e.code == 1 and not _task_started:
                raise SystemExit(EXIT_BAD_INPUT) from None
            raise

    return main


@contextlib.contextmanager
def exit_on_bad_input(log: logging.Logger | None):
    """Bad input (``InputError``: data, images, checkpoints) and configs that do not instantiate
    (unknown keys reach constructors as unexpected arguments) -> one line on stderr and in the
    run's log, exit status 2. ``HYDRA_FULL_ERROR=1`` keeps the traceback."""
    from hydra.errors import InstantiationException

    global _task_started
    _task_started = True
    try:
        yield
    except (InputError, InstantiationException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(e).split())  # hydra's messages span lines
        if log is not None:
            log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def compose_config(name: str, overrides: list[str], output_dir) -> DictConfig:
    """The config ``name`` (train, eval) exactly as the CLI composes it from ``configs/``, for
    scripts, notebooks and tests that run the library without Hydra's command line: the run
    directory is ``output_dir`` and ``HydraConfig`` is set, so ``${hydra:...}`` resolves."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg

