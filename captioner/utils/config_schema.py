"""Types and ranges of the user-facing config keys, checked when a run starts, before any work.

One line per key: a wrong value is one ``ConfigValueError`` naming the key, the value and what is
allowed, instead of a traceback from deep inside PyTorch or Lightning, or a failure only at test
time after the whole training. Keys absent from a config are not checked (experiments and data
presets differ); keys not listed here are left to the constructors they reach.

Why a table and not a Hydra structured config: a schema dataclass merged under ``train.yaml``
checks types but not ranges, and its struct mode would refuse every Trainer or data argument it
does not declare (``+trainer.<any Lightning argument>`` is part of the interface)."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from captioner.utils import hardware
from captioner.utils.errors import InputError

DECODE_PRECISIONS = (*hardware.DECODE_PRECISIONS, None)  # None: as the caller runs
DECODE_METHODS = ("greedy", "beam")


class ConfigValueError(InputError, ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


Check = Callable[[object], bool]


def integer(low: int | None = None, null: bool = False, also: tuple = ()) -> tuple[Check, str]:
    def ok(v):
        return (v is None and null) or v in also or (
            isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low))
    what = "an integer" + (f" >= {low}" if low is not None else "")
    what += "".join(f" or {a}" for a in also) + (" or null" if null else "")
    return ok, what


def number(low: float | None = None, above: float | None = None, below: float | None = None,
           null: bool = False) -> tuple[Check, str]:
    def ok(v):
        if v is None:
            return null
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
                and (low is None or v >= low) and (above is None or v > above)
                and (below is None or v < below))
    bounds = [f">= {low}" if low is not None else "", f"> {above}" if above is not None else "",
              f"< {below}" if below is not None else ""]
    return ok, "a number " + " and ".join(b for b in bounds if b) + (" or null" if null else "")


def one_of(*values) -> tuple[Check, str]:
    return (lambda v: v in values), "one of " + ", ".join("null" if v is None else str(v)
                                                          for v in values)


def decode_rules(prefix: str, null: bool = False) -> dict:
    return {f"{prefix}.method": one_of(*DECODE_METHODS, *((None,) if null else ())),
            f"{prefix}.beam_size": integer(1, null=null),
            f"{prefix}.max_length": integer(1, null=null),
            f"{prefix}.precision": one_of(*DECODE_PRECISIONS),
            f"{prefix}.ban_unk": one_of(True, False, *((None,) if null else ())),
            f"{prefix}.ban_bad_endings": one_of(True, False, *((None,) if null else ())),
            f"{prefix}.min_length": integer(0, null=True),
            f"{prefix}.length_penalty": number(low=0, null=True),
            f"{prefix}.no_repeat_ngram_size": integer(0, null=True)}


COMMON = {
    "threads": integer(1, null=True),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1, null=True),
    "data.num_workers": integer(0, null=True),
    "data.cache_batch_size": integer(1),
    "data.image_size": integer(1, null=True),  # null: the encoder's own input size
    "data.captions_per_image": integer(1),
    "data.max_caption_length": integer(1),
    "data.min_word_frequency": integer(1),
    "data.max_pixels": integer(1),
    "data.skip_bad_images": one_of(True, False),
}
TRAIN = {
    **COMMON,
    "seed": integer(),
    "trainer.max_epochs": integer(1, also=(-1,)),
    "trainer.min_epochs": integer(0, null=True),
    # as text: `trainer.precision=32` reaches the config as the integer 32
    "trainer.precision": (lambda v: isinstance(v, (str, int)) and str(v) in hardware.TRAINER_PRECISIONS,
                          one_of(*hardware.TRAINER_PRECISIONS)[1]),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.check_val_every_n_epoch": integer(1, null=True),
    "trainer.log_every_n_steps": integer(1),
    "trainer.gradient_clip_val": number(low=0, null=True),
    "optimizer.lr": number(above=0),
    "optimizer.weight_decay": number(low=0),
    "loss.label_smoothing": number(low=0, below=1),
    "loss.alpha_c": number(low=0, null=True),
    **decode_rules("decode"),
    **decode_rules("val_decode"),
}
EVALUATE = {**COMMON, "batch_size": integer(1), "split": one_of("train", "val", "test"),
            **decode_rules("decode", null=True)}


def check_config(cfg: DictConfig, rules: dict) -> None:
    """Raise ``ConfigValueError`` for the first key whose value breaks its rule."""
    for key, (ok, allowed) in rules.items():
        node = OmegaConf.select(cfg, key, default=_ABSENT)  # absent or ??? : not checked
        if node is _ABSENT:
            continue
        if not ok(node):
            raise ConfigValueError(f"config {key}={node!r}: must be {allowed}")


_ABSENT = object()
