"""Checkpoint -> a directory ONNX Runtime can caption from (``onnx_runtime.load``):

    encoder.onnx      images (B, 3, S, S) -> features (B, R, C)
    init_state.onnx   features (B, R, C) -> the decoder's state entries
    step.onnx         tokens (N,) + state -> logits (N, V), attention, the changed entries
    tokenizer.json    the checkpoint's tokenizer (Hugging Face ``tokenizers`` format)
    config.json       special ids, decoding defaults, preprocessing, opset, state layout

Batch (B images, N = B x beams or samples rows) and the Transformer's cache length are dynamic
axes. Graphs come from torch's dynamo exporter (``torch.export``); each is run once in ONNX
Runtime on the export's example inputs and compared with PyTorch before anything is written.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.export import Dim

from captioner.data.images import resolve_preprocess
from captioner.data.tokenizer import tokenizer_to_json
from captioner.export.graphs import EncoderGraph, InitStateGraph, StepGraph
from captioner.models.encoder import CNNEncoder, EfficientNetLiteEncoder
from captioner.models.lstm_decoder import LSTMDecoder
from captioner.models.transformer_decoder import TransformerDecoder
from captioner.utils.errors import InputError
from captioner.utils.io import atomic_write_bytes, atomic_write_json

FORMAT = "captioner-onnx"
FORMAT_VERSION = 1
OPSET = 18  # default: what the dynamo exporter writes natively; ONNX Runtime >= 1.14 runs it
MIN_OPSET = 18  # the dynamo exporter's lowest
FILES = {"encoder": "encoder.onnx", "init_state": "init_state.onnx", "step": "step.onnx",
         "tokenizer": "tokenizer.json"}
CONFIG = "config.json"
# example sizes: rows per image != 1 and images != rows, so no axis is specialised to its value
EXAMPLE_IMAGES, EXAMPLE_ROWS_PER_IMAGE, EXAMPLE_PAST = 2, 3, 2
VERIFY_ATOL = 1e-4


class ExportError(InputError):
    """A checkpoint or request the ONNX export cannot serve; the message names the part."""


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def check_supported(model, where: str) -> None:
    """Refuse, before exporting anything, the parts whose step state the graphs cannot carry."""
    enc, dec = model.encoder, model.decoder
    if not isinstance(enc, (CNNEncoder, EfficientNetLiteEncoder)):
        raise ExportError(f"{where}: encoder {type(enc).__name__} is not supported by the ONNX export")
    if isinstance(dec, LSTMDecoder) and dec.coattention is None:
        return
    if isinstance(dec, TransformerDecoder) and not dec.coattention:
        return
    why = ("fusion=coattention: its state grows new entries after the first step"
           if isinstance(dec, (LSTMDecoder, TransformerDecoder)) else "unknown decoder")
    raise ExportError(f"{where}: decoder {type(dec).__name__} is not supported by the ONNX export ({why})")


def _example_state(decoder, features: torch.Tensor):
    """(keys, static keys, moving keys, state) for the step export: G rows per image, and for a
    cache that grows, EXAMPLE_PAST positions already in it."""
    state = decoder.init_state(features)
    keys = list(state)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(f"decoder {type(decoder).__name__}: state entries {bad} are not tensors")
    static = [k for k in keys if k in decoder.static_state_keys]
    state = decoder.expand_state(state, EXAMPLE_ROWS_PER_IMAGE)
    n = features.size(0) * EXAMPLE_ROWS_PER_IMAGE
    tokens = torch.arange(n) % decoder.vocab_size
    steps = EXAMPLE_PAST if isinstance(decoder, TransformerDecoder) else 1
    for _ in range(steps):
        _, new, _ = decoder.step(tokens, state)
        moving = [k for k in keys if new[k] is not state[k]]
        state = new
    return keys, static, moving, state, tokens


def _onnx_bytes(module, args, names_in, names_out, shapes, opset, graph: str, where: str) -> bytes:
    try:
        with warnings.catch_warnings():  # the exporter warns about every axis it renames
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=names_in, output_names=names_out,
                dynamic_shapes=shapes, opset_version=opset, external_data=False, verbose=False,
            )  # fmt: skip
    except Exception as e:  # the exporter's multi-page report: keep its first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{where}: exporting {graph} failed ({type(e).__name__}: {first})") from None
    data = program.model_proto.SerializeToString()
    _verify(data, module, args, names_in, graph, where)
    return data


def _verify(data: bytes, module, args, names_in, graph: str, where: str) -> None:
    """Run the graph in ONNX Runtime on the export's example inputs: same outputs as PyTorch."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(names_in, args)})
    want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    for name, g, w in zip((o.name for o in session.get_outputs()), got, want):
        err = float((torch.from_numpy(g) - w).abs().max()) if w.numel() else 0.0
        if tuple(g.shape) != tuple(w.shape) or not err <= VERIFY_ATOL:
            raise ExportError(f"{where}: {graph} output {name} differs from PyTorch in ONNX Runtime "
                              f"(shape {g.shape} vs {tuple(w.shape)}, max error {err:.2e})")


def export_model(model, tokenizer, decode: dict, image_size: int, out: Path, opset: int = OPSET,
                 where: str = "model", preprocess: dict | None = None) -> dict:
    """Write the five files of an export into ``out``; returns the config written.
    ``preprocess``: the checkpoint's stored one (None: ImageNet statistics at ``image_size``)."""
    if not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"opset {opset} is not supported: this exporter writes opsets "
                          f"{MIN_OPSET}..{max_opset()}")
    check_supported(model, where)
    model = model.eval()
    dec = model.decoder
    preprocess = resolve_preprocess(preprocess, image_size)
    images = torch.randn(EXAMPLE_IMAGES, 3, *preprocess["size"])  # (B, 3, H, W)
    B, rows = Dim("images", min=1), Dim("rows", min=1)
    with torch.no_grad():
        features = model.encode(images)  # (B, R, C)
        keys, static, moving, state, tokens = _example_state(dec, features)
        graphs = {
            "encoder": _onnx_bytes(EncoderGraph(model), (images,), ["images"], ["features"],
                                   {"images": {0: B}}, opset, "encoder", where),
            "init_state": _onnx_bytes(InitStateGraph(dec, keys), (features,), ["features"],
                                      [f"init_{k}" for k in keys],
                                      {"features": {0: B}}, opset, "init_state", where),
        }
        axes = []
        for k in keys:  # first axis: images for static entries, rows for the others
            ax = {0: B if k in static else rows}
            if k in ("self_k", "self_v"):  # (N, L, H, t, d): the cache grows along t
                ax[3] = Dim("past", min=0, max=dec.max_length - 1)
            axes.append(ax)
        graphs["step"] = _onnx_bytes(
            StepGraph(dec, keys, moving), (tokens, *(state[k] for k in keys)), ["tokens", *keys],
            ["logits", "attention", *(f"next_{k}" for k in moving)],
            {"tokens": {0: rows}, "state": tuple(axes)}, opset, "step", where,
        )  # fmt: skip
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "opset": opset,
        "files": FILES,
        "special_ids": {"pad": model.pad_id, "bos": model.bos_id, "eos": model.eos_id,
                        "unk": model.unk_id, "bad_endings": list(model.bad_ending_ids)},
        "vocab_size": dec.vocab_size,
        "decode": {k: v for k, v in decode.items() if k != "precision"},
        # the checkpoint's own preprocessing (``data/images.py`` builds the transform from it)
        "preprocess": {**preprocess, "image_size": image_size,
                       "scale": 1 / 255, "layout": "NCHW RGB"},
        "features": {"regions": features.size(1), "channels": features.size(2)},
        "decoder": {"class": type(dec).__name__, "state": keys, "static_state_keys": static,
                    "moving_state_keys": moving,
                    "max_length": getattr(dec, "max_length", None)},
        "exported_with": {"torch": torch.__version__},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, data in graphs.items():
        atomic_write_bytes(out / FILES[name], data)
    atomic_write_bytes(out / FILES["tokenizer"], tokenizer_to_json(tokenizer).encode("utf-8"))
    atomic_write_json(out / CONFIG, config)  # last: a DIR with a config is complete
    return config


def export_checkpoint(checkpoint, out, opset: int = OPSET) -> dict:
    """``captioner-export``: a checkpoint file -> an export directory."""
    from captioner.checkpoint import load_checkpoint

    model, tokenizer, payload = load_checkpoint(checkpoint)
    return export_model(model, tokenizer, payload["decode"], payload["image_size"], Path(out),
                        opset, where=str(checkpoint), preprocess=payload.get("preprocess"))
