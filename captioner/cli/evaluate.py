"""python evaluate.py ckpt_path=PATH [split=test] [data=...] [decode.beam_size=5]

``ckpt_path=[A,B,...]`` (a list) decodes the checkpoints as one ensemble (``models/ensemble.py``).

Writes, into the run's own directory: ``results_{split}.json`` (COCO results format),
``metrics_{split}.json`` (pycocoevalcap metrics + decoding settings) and
``per_image_{split}.json`` (caption, references and CIDEr-D per image, worst first)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from captioner.utils.config_schema import EVALUATE, check_config
from captioner.utils.cpu import keep_freed_memory
from captioner.utils.hydra import (
    CONFIG_DIR,
    exit_2_on_config_errors,
    exit_on_bad_input,
    register_resolvers,
)

log = logging.getLogger("captioner.evaluate")
register_resolvers()

TABLE_KEYS = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice"]


def format_table(metrics: dict) -> str:
    keys = [k for k in TABLE_KEYS if k in metrics]
    head = " | ".join(f"{k:>8}" for k in keys)
    row = " | ".join(f"{metrics[k]:8.4f}" for k in keys)
    return f"{head}\n{row}\n(CIDEr-D on the 0-10 scale; papers print it x100)"


def _resolved(ckpt):
    return [_resolved(c) for c in ckpt] if isinstance(ckpt, list) else str(Path(ckpt).resolve())


def run(cfg: DictConfig, output_dir: str | Path) -> dict:
    from hydra.utils import instantiate

    from captioner.checkpoint import load_checkpoints
    from captioner.inference import caption_loader, decode_settings
    from captioner.metrics.coco_eval import evaluate_captions
    from captioner.utils.hardware import auto_precision, set_threads
    from captioner.utils.io import atomic_write_json

    check_config(cfg, EVALUATE)
    _, threads_reason = set_threads(cfg.get("threads"))
    log.info("threads: %s", threads_reason)
    ckpt = cfg.ckpt_path  # a path, or a list of them: an ensemble
    ckpt = OmegaConf.to_container(ckpt, resolve=True) if OmegaConf.is_list(ckpt) else ckpt
    model, tokenizer, payload = load_checkpoints(ckpt)
    decode = decode_settings(payload["decode"], OmegaConf.to_container(cfg.decode))
    if decode["precision"] == "auto":
        log.info("precision: %s", auto_precision("cpu").reason)  # the model is loaded on the CPU
    datamodule = instantiate(cfg.data, image_size=payload["image_size"], eval_batch_size=cfg.batch_size)
    datamodule.set_preprocess(payload.get("preprocess"))  # what the model was trained on
    datamodule.prepare_data()
    datamodule.set_tokenizer(tokenizer)
    if datamodule.cache_features:  # data.cache_features=true: the encoder's cached features
        datamodule.set_encoder(model.encoder, inference=True)  # fine-tuned ones too: none trains
    split = cfg.split
    hyps = caption_loader(model, tokenizer, datamodule.dataloader(split), decode)
    refs = {i: c for i, c in datamodule.references(split).items() if i in hyps}
    report = evaluate_captions(refs, hyps, spice=cfg.spice)

    out = Path(output_dir)
    atomic_write_json(out / f"results_{split}.json",
                      [{"image_id": i, "caption": c} for i, c in sorted(hyps.items())])
    atomic_write_json(out / f"metrics_{split}.json", {
        "checkpoint": _resolved(ckpt), "split": split, "num_images": len(hyps),
        "decode": decode, "metrics": report.metrics, "skipped": report.skipped,
        "cider_scale": "CIDEr-D, 0-10 (x100 in papers)",
    })
    per_image = [{"image_id": i, "caption": hyps[i], "references": refs[i],
                  **{k: v for k, v in report.per_image.get(i, {}).items()}} for i in hyps]
    per_image.sort(key=lambda r: r.get("cider", 0.0))
    atomic_write_json(out / f"per_image_{split}.json", per_image)
    for name, reason in report.skipped.items():
        log.warning("%s skipped: %s", name, reason)
    print(format_table(report.metrics))
    print(f"wrote {out}/results_{split}.json, metrics_{split}.json, per_image_{split}.json")
    return report.metrics


@exit_2_on_config_errors
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    keep_freed_memory()
    with exit_on_bad_input(log):
        run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
