"""python train.py [overrides]: compose the config, build data/model/trainer, fit, test."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from captioner.utils.hydra import CONFIG_DIR, register_resolvers

log = logging.getLogger("captioner.train")
register_resolvers()


def run(cfg: DictConfig) -> dict:
    """Train (and test) from a composed config; returns the final metrics. Library entry point
    used by the CLI and the tests."""
    import lightning as L
    from hydra.utils import instantiate

    from captioner.checkpoint import build_model
    from captioner.training.module import CaptioningModule

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tok = datamodule.tokenizer
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    model_config.update(vocab_size=len(tok), pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id)
    model = build_model(model_config)
    module = CaptioningModule(
        model=model, tokenizer=tok, model_config=model_config,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.get("scheduler_interval", "epoch"),
        decode=OmegaConf.to_container(cfg.decode), val_decode=OmegaConf.to_container(cfg.val_decode),
        image_size=datamodule.image_size, **cfg.loss,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("vocabulary %d words, model %.2fM parameters", len(tok), n_params / 1e6)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if not loggers:  # a learning-rate monitor has nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        if best:
            log.info("best checkpoint: %s", best)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
