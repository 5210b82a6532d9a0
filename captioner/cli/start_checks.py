"""A Hydra callback that checks a run before Hydra creates or touches its directory.

``on_run_start`` comes after the config is composed and before Hydra makes the run directory,
writes ``.hydra/`` and opens the log file. So a config value out of range, an ambiguous
``ckpt_path=last`` or a resume refused for another model config leaves every file as it was
(the run's own checks in ``train.run`` / ``evaluate.run`` repeat the value checks for library
callers and multirun jobs). A resume that is accepted keeps the run's original ``.hydra/``
and stores its own config beside it in ``.hydra/resume-<time>/``."""

from __future__ import annotations

import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from captioner.utils.config_schema import EVALUATE, TRAIN, check_config
from captioner.utils.hydra import LAST_CHECKPOINT, exit_on_bad_input, run_to_resume

RULES = {"train": TRAIN, "eval": EVALUATE}


def resume_checkpoint_path(cfg: DictConfig, run_dir: Path | None = None) -> Path | None:
    """``ckpt_path`` as a file. ``last``: ``run_dir``'s checkpoint when given (inside the task,
    where the ``run_dir`` resolver already chose the directory), else that of ``run_to_resume``,
    which also reports an ambiguous choice."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None or str(ckpt_path) != "last":
        return None if ckpt_path is None else Path(str(ckpt_path))
    if run_dir is not None and (run_dir / LAST_CHECKPOINT).is_file():
        return run_dir / LAST_CHECKPOINT
    task_dir = Path(cfg.paths.log_dir) / cfg.task_name
    run = run_to_resume(task_dir)
    if run is None or (run_dir is not None and run != run_dir):
        from captioner.checkpoint import CheckpointError

        raise CheckpointError(f"ckpt_path=last: no earlier run with {LAST_CHECKPOINT} under "
                              f"{task_dir} to resume")
    return run / LAST_CHECKPOINT


def check_resume(cfg: DictConfig, run_dir: Path | None = None) -> tuple[Path | None, dict | None]:
    """(checkpoint, its captioner payload) that a training config resumes, checked to be
    readable and saved for the same model config (given the checkpoint's vocabulary);
    (None, None) without ``ckpt_path``."""
    path = resume_checkpoint_path(cfg, run_dir)
    if path is None:
        return None, None
    from captioner.checkpoint import KEY, check_same_model_config, read_checkpoint
    from captioner.data.tokenizer import tokenizer_from_json, with_vocabulary

    payload = read_checkpoint(path)[KEY]
    wanted = with_vocabulary(OmegaConf.to_container(cfg.model, resolve=True),
                              tokenizer_from_json(payload["tokenizer"]))
    check_same_model_config(path, payload["model_config"], wanted)
    return path, payload


class StartChecks(Callback):
    """Registered in ``configs/hydra/default.yaml``; errors exit 2 with one line, as in the task."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the checked keys
        with exit_on_bad_input(None):
            check_config(config, RULES.get(config_name or "", {}))
            if config_name == "train" and check_resume(config)[0] is not None:
                run = Path(OmegaConf.select(config, "hydra.run.dir"))
                if (run / ".hydra" / "config.yaml").is_file():
                    with read_write(config.hydra), open_dict(config.hydra):
                        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
                        config.hydra.output_subdir = f".hydra/resume-{stamp}"
