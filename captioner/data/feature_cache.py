"""Features (R, C) of a frozen encoder (or the map of a fine-tuning CNN's frozen trunk),
computed once per image list and kept on disk.

One cache entry is a folder ``{cache_dir}/{name}-{key[:16]}/`` holding ``features.npy``
(N, R, C), read memory-mapped, ``valid.npy`` (N,) (False: an unreadable image, skipped) and
``meta.json`` (features.npy holds whatever the module gives per image, e.g. (C', h, w) for a
trunk). The key hashes everything the features depend on: the encoder's class, name and
weights (a hash of its state dict, so even a randomly initialised encoder is keyed by its values),
the transform (image size, normalisation), the storage dtype and the image list (real path, size,
mtime), so any change gives a new entry. An entry is written into a temporary folder and renamed
into place when complete: a killed extraction leaves no entry that could be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captioner.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from captioner.models.encoders import inference_copy
from captioner.utils.hardware import resolve_decode_precision

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def _weights_hash(encoder: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(encoder: torch.nn.Module, transform, paths: list[str], dtype: str = "float32",
              precision: str = "fp32") -> tuple[str, dict]:
    """(hex key, the plain-data description it hashes)."""
    identity = encoder.identity() if hasattr(encoder, "identity") else {"class": type(encoder).__name__}
    files = []
    for p in paths:
        try:
            st = os.stat(p)
            files.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
        except OSError:
            files.append([os.path.realpath(p), None, None])
    desc = {
        "format_version": FORMAT_VERSION,
        "encoder": identity,
        "weights_sha256": _weights_hash(encoder),
        "transform": repr(transform),
        "dtype": dtype,
        "precision": precision,  # the autocast the features were computed in
        "images_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
        "num_images": len(paths),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return key, desc


class ImageFiles(Dataset):
    def __init__(self, paths, transform, max_pixels):
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(load_image(self.paths[i], self.max_pixels)), True
        except ImageLoadError as e:
            return str(e), False


def collate_images(items):
    ok = [v for _, v in items]
    errors = [x for x, v in items if not v]
    images = [x for x, v in items if v]
    return (torch.stack(images) if images else None), torch.tensor(ok), errors


class FeatureCache:
    """A complete cache entry, read-only and memory-mapped (opened lazily, so that each data
    loader worker maps the file itself instead of receiving a copy)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._features = self._valid = None

    @property
    def features(self) -> np.ndarray:  # (N, R, C)
        if self._features is None:
            self._features = np.load(self.folder / "features.npy", mmap_mode="r")
        return self._features

    @property
    def valid(self) -> np.ndarray:  # (N,)
        if self._valid is None:
            self._valid = np.load(self.folder / "valid.npy")
        return self._valid

    def __len__(self) -> int:
        return self.meta["shape"][0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[i], dtype=np.float32))  # (R, C)

    def rows(self, indices) -> torch.Tensor:
        """Several rows at once, float32 (n, R, C): one fancy-indexed read of the memory map
        (ascending order, then put back in the order asked) and one dtype conversion for the
        whole batch instead of one per item."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        block = self.features[idx[order]]  # a copy, read in file order
        out = np.empty_like(block, dtype=np.float32)
        out[order] = block
        return torch.from_numpy(out)

    def __getstate__(self):  # workers re-open the memory map
        return {"folder": self.folder, "meta": self.meta, "_features": None, "_valid": None}


def _checked(fast, encoder, images, tol: float = 1e-3):
    """``fast`` if it matches ``encoder`` on ``images`` (relative to the output's scale), else
    ``encoder`` with a warning: folding must never change what is cached."""
    ref = encoder(images)
    err = (fast(images.contiguous(memory_format=torch.channels_last)) - ref).abs().max().item()
    if err <= tol * max(1.0, ref.abs().max().item()):
        return fast
    log.warning("BatchNorm folding changed %s's output by %.3g: extracting unfolded",
                type(encoder).__name__, err)
    return encoder


@torch.inference_mode()
def _extract(encoder, paths, transform, out: Path, dtype: str, batch_size: int,
             num_workers: int, max_pixels: int, skip_bad_images: bool, desc: str,
             precision: str = "fp32") -> None:
    loader = DataLoader(ImageFiles(paths, transform, max_pixels), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_images)
    device = next(encoder.parameters()).device
    fast = inference_copy(encoder)
    features = valid = None
    start = 0
    for images, ok, errors in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        if errors and not skip_bad_images:
            raise ImageLoadError(f"{errors[0]} (data.skip_bad_images=true skips unreadable images)")
        for e in errors:
            log.warning("skipping bad image: %s", e)
        if images is not None:
            images = images.to(device)
            if fast is not encoder and features is None:  # first batch: is the copy the same?
                fast = _checked(fast, encoder, images[:4])
            with torch.autocast(device.type, dtype=AUTOCAST.get(precision, torch.bfloat16),
                                enabled=precision in AUTOCAST):
                f = fast(images.contiguous(memory_format=torch.channels_last))
            f = f.float().cpu().numpy()  # (b, R, C)
            if features is None:
                features = np.lib.format.open_memmap(
                    out / "features.npy", mode="w+", dtype=DTYPES[dtype],
                    shape=(len(paths), *f.shape[1:]))
                valid = np.zeros(len(paths), dtype=bool)
            rows = start + np.flatnonzero(ok.numpy())
            features[rows] = f
            valid[rows] = True
        start += len(ok)
    if features is None:
        raise ImageLoadError(f"no readable image among {len(paths)} (first: {paths[0]})")
    features.flush()
    del features
    np.save(out / "valid.npy", valid)


def cached_features(
    encoder: torch.nn.Module,
    paths: list[str],
    transform,
    cache_dir: str | Path,
    name: str = "images",
    dtype: str = "float32",
    batch_size: int = 32,
    num_workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    skip_bad_images: bool = False,
    precision: str = "auto",
) -> FeatureCache:
    """The cache entry for (encoder, transform, paths), extracting it first if needed.

    ``encoder`` maps transformed images (B, 3, S, S) to (B, R, C); it runs in eval mode without
    gradients on its own device, under ``precision`` (``auto``: bf16 autocast only where the
    hardware runs it natively). ``name`` only makes the folder readable (e.g. the split)."""
    if dtype not in DTYPES:
        raise ValueError(f"data.cache_dtype={dtype!r}: one of {sorted(DTYPES)}")
    device = next(encoder.parameters()).device
    precision = resolve_decode_precision(precision, device.type) or "fp32"
    key, desc = cache_key(encoder, transform, paths, dtype, precision)
    root = Path(cache_dir)
    folder = root / f"{name}-{key[:16]}"
    if (folder / "meta.json").is_file():
        return FeatureCache(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.", suffix=".tmp"))
    was_training = encoder.training
    try:
        encoder.eval()
        _extract(encoder, paths, transform, tmp, dtype, batch_size, num_workers, max_pixels,
                 skip_bad_images, desc=f"caching {name} features", precision=precision)
        shape = list(np.load(tmp / "features.npy", mmap_mode="r").shape)
        (tmp / "meta.json").write_text(json.dumps({**desc, "key": key, "shape": shape}, indent=2))
        for f in tmp.iterdir():  # on disk before the rename makes the entry visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same entry first: use theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        encoder.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s features %s in %s", name, shape, folder)
    return FeatureCache(folder)
