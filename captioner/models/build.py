"""Build a ``Captioner`` from its plain-data config (the ``model`` section, as a checkpoint stores
it), without Hydra's ``instantiate``.

A checkpoint may come from anyone, so its config is treated as data: it is checked against an
allowlist of the model classes and their constructor arguments *before* any constructor runs.
``instantiate`` would import and call whatever ``_target_`` names (a function that writes files,
an attribute path into another module), follow ``_args_`` and nested targets anywhere; here the
only callables are the classes below, each in its one place in the tree (attention modules are
chosen by name inside the decoders, from ``attention.ATTENTIONS``)."""

from __future__ import annotations

import functools
import inspect

from captioner.models.captioner import Captioner
from captioner.models.encoders import (
    ENCODER_CLASSES,
    CNNEncoder,
    EfficientNetLiteEncoder,
    from_checkpoint,
)
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.transformer_decoder import TransformerDecoder

CAPTIONERS = {"captioner.models.captioner.Captioner": Captioner}
# Each encoder class under the module that defines it, plus the two the configs and checkpoints
# written before the encoders package name (``captioner.models.encoder`` re-exports them).
ENCODERS = {f"{c.__module__}.{c.__name__}": c for c in ENCODER_CLASSES} | {
    "captioner.models.encoder.CNNEncoder": CNNEncoder,
    "captioner.models.encoder.EfficientNetLiteEncoder": EfficientNetLiteEncoder}
DECODERS = {"captioner.models.lstm_decoder.LSTMDecoder": LSTMDecoder,
            "captioner.models.transformer_decoder.TransformerDecoder": TransformerDecoder}
SCALARS = (str, int, float, bool, type(None))


class ModelConfigError(ValueError):
    """A model config that is not a buildable captioner; the message says which key."""


def _plain(value, where: str) -> None:
    """Arguments are scalars or lists of them: no mappings, hence no nested targets."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _plain(v, f"{where}[{i}]")
    elif not isinstance(value, SCALARS):
        raise ModelConfigError(f"{where}: {type(value).__name__} value where only numbers, "
                               "strings, booleans or lists of them are allowed")


def _checked(node, where: str, allowed: dict, partial: bool, children: tuple[str, ...] = (),
             late: tuple[str, ...] = ()):
    """(class, kwargs) of one node, after checking target, special keys and argument names;
    ``late``: arguments supplied at build time (a partial decoder's vocabulary and sizes)."""
    if not isinstance(node, dict):
        raise ModelConfigError(f"{where}: expected a mapping with _target_, got {type(node).__name__}")
    target = node.get("_target_")
    if not isinstance(target, str) or target not in allowed:
        raise ModelConfigError(f"{where}._target_={target!r} is not one of {sorted(allowed)}")
    cls = allowed[target]
    special = {k for k in node if isinstance(k, str) and k.startswith("_") and k.endswith("_")}
    if partial and node.get("_partial_") is not True:
        raise ModelConfigError(f"{where}: must have _partial_: true (completed at build time)")
    extra = special - {"_target_"} - ({"_partial_"} if partial else set())
    if extra:
        raise ModelConfigError(f"{where}: {sorted(extra)} not allowed in a model config")
    kwargs = {k: v for k, v in node.items() if k not in special}
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in params or k == "self"
               or params[k].kind not in (params[k].POSITIONAL_OR_KEYWORD, params[k].KEYWORD_ONLY)]
    if unknown:
        raise ModelConfigError(f"{where}: {target.rsplit('.', 1)[1]} has no argument(s) {unknown}")
    missing = [k for k, p in params.items() if k != "self" and p.default is p.empty
               and p.kind is not p.VAR_POSITIONAL and k not in kwargs and k not in late]
    if missing:
        raise ModelConfigError(f"{where}: lacks {missing}")
    for k, v in kwargs.items():
        if k not in children:
            _plain(v, f"{where}.{k}")
    return cls, kwargs


def _check(config) -> tuple:
    cls, top = _checked(config, "model", CAPTIONERS, False, children=("encoder", "decoder"))
    encoder = _checked(top.get("encoder"), "model.encoder", ENCODERS, False)
    decoder = _checked(top.get("decoder"), "model.decoder", DECODERS, True,
                       late=("vocab_size", "encoder_dim", "pad_id"))
    return cls, top, encoder, decoder


def check_model_config(config: dict) -> None:
    """Raise ``ModelConfigError`` unless ``config`` is a captioner built only from allowlisted
    classes with known arguments; calls nothing."""
    _check(config)


def build_captioner(config: dict, stored_encoder: dict | None = None) -> Captioner:
    """The model of a plain-data config, checked in full before any constructor runs.

    ``stored_encoder``: the architecture record a checkpoint holds (None: not building from a
    checkpoint). With it the encoder is built without its pretrained files, which the
    checkpoint's weights replace anyway (``encoders.base.from_checkpoint``)."""
    cls, top, (enc_cls, enc), (dec_cls, dec) = _check(config)
    rest = {k: v for k, v in top.items() if k not in ("encoder", "decoder")}
    if stored_encoder is None:
        encoder = enc_cls(**enc)
    else:
        with from_checkpoint(stored_encoder):
            encoder = enc_cls(**enc)
    return cls(encoder=encoder, decoder=functools.partial(dec_cls, **dec), **rest)
