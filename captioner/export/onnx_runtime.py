"""Caption from an export directory (``onnx_export``) with ONNX Runtime.

The graphs run in ONNX Runtime; the search is ``captioner.models.search`` itself, unchanged:
``OnnxStepDecoder`` speaks the step interface (``models/decoder.py``) by feeding the state's
tensors to ``step.onnx`` as numpy arrays, and the search keeps its own bookkeeping (top-k, beam
reordering, bans) in torch on the CPU. ``load(DIR)`` gives an object with the PyTorch
``Captioner``'s inference calls (``encode``, ``generate``), so ``caption.py --onnx`` and a server
use it like a checkpoint's model.

Every way a directory can fail to be an export (missing, a missing file, a foreign or newer
config, a graph whose opset is not the one the config states, a graph ONNX Runtime cannot load,
graph inputs that do not match the config) is one ``OnnxLoadError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from captioner.export.onnx_export import CONFIG, FILES, FORMAT, FORMAT_VERSION
from captioner.models.decoder import StepDecoder
from captioner.models.search import generate as search_generate
from captioner.models.search import vocabulary_bans
from captioner.utils.errors import InputError


class OnnxLoadError(InputError):
    """A directory that is not a usable ONNX export; the message names the file."""


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def read_config(directory) -> dict:
    """config.json of an export, checked to be ours and complete (every file present)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OnnxLoadError(f"{directory}: ONNX export directory not found")
    path = directory / CONFIG
    if not path.is_file():
        raise OnnxLoadError(f"{path}: missing (not a captioner ONNX export, or an interrupted one)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OnnxLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise OnnxLoadError(f"{path}: not a captioner ONNX export config (format is not {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise OnnxLoadError(f"{path}: export format {config.get('format_version')}, this captioner "
                            f"reads {FORMAT_VERSION}")
    for name in FILES.values():
        if not (directory / name).is_file():
            raise OnnxLoadError(f"{directory / name}: missing from the ONNX export")
    return config


def graph_opset(path: Path) -> int | None:
    """The default-domain opset a graph declares."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OnnxLoadError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _session(path: Path, config: dict, threads: int | None, inputs: list[str]):
    import onnxruntime as ort

    opset = graph_opset(path)
    if opset != config["opset"]:
        raise OnnxLoadError(f"{path}: opset {opset}, but {CONFIG} states opset {config['opset']} "
                            "(files from different exports? export again)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise OnnxLoadError(f"{path}: ONNX Runtime {ort.__version__} cannot load it ({first})") from None
    got = [i.name for i in session.get_inputs()]
    if got != inputs:
        raise OnnxLoadError(f"{path}: graph inputs {got} do not match {CONFIG} ({inputs})")
    return session


class OnnxStepDecoder(StepDecoder):
    """The step interface over ``init_state.onnx`` and ``step.onnx``. ``reorder_state`` and
    ``expand_state`` are the base class's (index_select on the torch tensors); the state keys,
    which of them are static (one row per image) and which ``step`` changes come from the
    export's config."""

    def __init__(self, init_session, step_session, config: dict):
        super().__init__()
        layout = config["decoder"]
        self._init, self._step = init_session, step_session
        self.keys, self.moving = list(layout["state"]), list(layout["moving_state_keys"])
        self.static_state_keys = tuple(layout["static_state_keys"])
        self.vocab_size = config["vocab_size"]

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        outs = self._init.run(None, {"features": _np(features)})  # features (B, R, C)
        return {k: torch.from_numpy(v) for k, v in zip(self.keys, outs)}

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict, Tensor]:
        feeds = {"tokens": _np(tokens), **{k: _np(state[k]) for k in self.keys}}
        logits, attn, *new = self._step.run(None, feeds)  # (N, V), (N, [H,] R), moving entries
        changed = {k: torch.from_numpy(v) for k, v in zip(self.moving, new)}
        return torch.from_numpy(logits), {**state, **changed}, torch.from_numpy(attn)


class OnnxCaptioner:
    """An exported captioner: ``encode`` and ``generate`` as on the PyTorch ``Captioner``, plus
    what a checkpoint's payload gives (``tokenizer``, ``image_size``, ``decode`` defaults)."""

    def __init__(self, directory: Path, config: dict, sessions: dict, tokenizer):
        self.directory, self.config, self.tokenizer = directory, config, tokenizer
        self._encoder = sessions["encoder"]
        self.decoder = OnnxStepDecoder(sessions["init_state"], sessions["step"], config)
        ids = config["special_ids"]
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        # the search's bans (``search.vocabulary_bans``; absent from exports made before them)
        self.unk_id, self.bad_ending_ids = ids.get("unk"), list(ids.get("bad_endings", ()))
        self.image_size = config["preprocess"]["image_size"]
        # the checkpoint's preprocessing (exports before it was stored: None, ImageNet statistics)
        self.preprocess = config["preprocess"] if "size" in config["preprocess"] else None
        self.decode = dict(config["decode"])

    def eval(self):  # what callers of the torch model do first
        return self

    def encode(self, images: Tensor) -> Tensor:
        return torch.from_numpy(self._encoder.run(None, {"images": _np(images.float())})[0])  # (B, R, C)

    @torch.no_grad()
    def generate(self, images: Tensor | None = None, features: Tensor | None = None,
                 precision: str | None = None, ban_unk: bool = True, ban_bad_endings: bool = True,
                 **decode) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and attention (B, L, R), as ``Captioner.generate`` (with its bans).
        The graphs are float32: ``precision`` may only be None, ``auto`` or ``fp32``."""
        if precision not in (None, "auto", "fp32"):
            raise OnnxLoadError(f"precision {precision!r}: an ONNX export runs in fp32 only")
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images and features")
        features = self.encode(images) if features is None else features  # (B, R, C)
        return search_generate(self.decoder, features, bos_id=self.bos_id, eos_id=self.eos_id,
                               pad_id=self.pad_id, **decode,
                               **vocabulary_bans(self.unk_id, self.bad_ending_ids, ban_unk,
                                                 ban_bad_endings))

    def caption_files(self, paths: list, batch_size: int = 16, **decode) -> list[dict]:
        """``captioner.inference.caption_files`` with this model and its decoding defaults."""
        from captioner.inference import caption_files, decode_settings

        settings = decode_settings(self.decode, decode)
        return caption_files(self, self.tokenizer, paths, self.image_size, settings, batch_size,
                             preprocess=self.preprocess)


def load(directory, threads: int | None = None) -> OnnxCaptioner:
    """An export directory -> ``OnnxCaptioner`` (``threads``: ONNX Runtime's intra-op threads,
    default torch's)."""
    from captioner.data.tokenizer import tokenizer_from_json

    directory = Path(directory)
    config = read_config(directory)
    keys = list(config["decoder"]["state"])
    inputs = {"encoder": ["images"], "init_state": ["features"], "step": ["tokens", *keys]}
    sessions = {name: _session(directory / FILES[name], config, threads, want)
                for name, want in inputs.items()}
    path = directory / FILES["tokenizer"]
    try:
        tokenizer = tokenizer_from_json(path.read_text(encoding="utf-8"))
    except Exception as e:
        raise OnnxLoadError(f"{path}: tokenizer does not load ({type(e).__name__})") from None
    return OnnxCaptioner(directory, config, sessions, tokenizer)
