"""python train.py [overrides]: compose the config, build data/model/trainer, fit, test.

``ckpt_path=last`` resumes the newest run in its own directory (``ckpt_path=PATH``: that
checkpoint, in its run's directory when it lies in one), with the checkpoint's tokenizer and
model config; the final result equals an uninterrupted run with the same seed (see
``training/resume.py``). ``metrics.json`` in the run directory holds the final metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from captioner.cli.start_checks import check_resume
from captioner.utils.config_schema import TRAIN, check_config
from captioner.utils.cpu import keep_freed_memory
from captioner.utils.hydra import (
    CONFIG_DIR,
    exit_2_on_config_errors,
    exit_on_bad_input,
    register_resolvers,
)

log = logging.getLogger("captioner.train")
register_resolvers()


def run(cfg: DictConfig) -> dict:
    """Train (and test) from a composed config; returns the final metrics. Library entry point
    used by the CLI and the tests."""
    import lightning as L
    from hydra.utils import instantiate

    from captioner.checkpoint import build_model
    from captioner.data.tokenizer import tokenizer_from_json, with_vocabulary
    from captioner.training.checkpoint_io import AtomicCheckpointIO
    from captioner.training.module import CaptioningModule
    from captioner.training.resume import ExactResume
    from captioner.utils.hardware import resolve_trainer_precision, set_threads
    from captioner.utils.io import atomic_write_json

    check_config(cfg, TRAIN)  # values, then the resumed checkpoint: before any work
    ckpt_path, resumed = check_resume(cfg, Path(cfg.paths.output_dir))
    threads, threads_reason = set_threads(cfg.get("threads"))
    precision, precision_reason = resolve_trainer_precision(
        cfg.trainer.get("precision", "auto"), cfg.trainer.get("accelerator", "auto"))
    log.info("threads: %s; precision: %s", threads_reason, precision_reason)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    if resumed:  # the checkpoint's vocabulary, not one retrained on possibly changed data
        datamodule.set_tokenizer(tokenizer_from_json(resumed["tokenizer"]))
    datamodule.setup("fit")
    tok = datamodule.tokenizer
    model_config = with_vocabulary(OmegaConf.to_container(cfg.model, resolve=True), tok)
    model = build_model(model_config)
    # images as the encoder expects them (its size, resize, crop, mean/std)
    datamodule.set_preprocess(getattr(model.encoder, "preprocess", None))
    preprocess = datamodule.preprocess
    log.info("preprocessing: %s", preprocess)
    if datamodule.cache_features:  # the frozen encoder whose features the loaders serve
        datamodule.set_encoder(model.encoder)
    if cfg.get("compile"):  # in place: parameter names, hence checkpoints, stay the same
        model.decoder.compile()
    module = CaptioningModule(
        model=model, tokenizer=tok, model_config=model_config,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.get("scheduler_interval", "epoch"),
        decode=OmegaConf.to_container(cfg.decode), val_decode=OmegaConf.to_container(cfg.val_decode),
        image_size=preprocess["size"][0], preprocess=preprocess, **cfg.loss,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("vocabulary %d words, model %.2fM parameters", len(tok), n_params / 1e6)
    # `callbacks.early_stopping=null` switches one off
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ExactResume(cfg.seed))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if not loggers:  # a learning-rate monitor has nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          plugins=[AtomicCheckpointIO()], precision=precision)
    hardware = {"precision": precision, "precision_reason": precision_reason,
                "threads": threads, "threads_reason": threads_reason}
    for logger in trainer.loggers:  # what `auto` resolved to, beside the config (csv/hparams.yaml)
        logger.log_hyperparams({"hardware": hardware})
    if trainer.is_global_zero:  # the run's vocabulary, readable without a checkpoint
        tok.save_pretrained(Path(cfg.paths.output_dir) / "tokenizer")
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        if best:
            log.info("best checkpoint: %s", best)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    return metrics


@exit_2_on_config_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()
    with exit_on_bad_input(log):
        run(cfg)


if __name__ == "__main__":
    main()
