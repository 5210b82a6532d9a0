"""LightningDataModule: caption tables (HF ``datasets``) + images -> padded batches.

A training item is one image with ``captions_per_image`` of its captions, so the encoder runs once
per image and the decoder sees all k captions (the image's features are shared, not recomputed k times).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data.captions import CaptionDataError, ImageCaptions, read_split
from captioner.data.feature_cache import FeatureCache, cached_features
from captioner.data.folder import prepare_folder, split_by_hash
from captioner.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    build_transform,
    load_image,
    resolve_preprocess,
)
from captioner.data.tokenizer import encode, train_tokenizer
from captioner.utils.hardware import auto_workers, spare_cores

log = logging.getLogger(__name__)
CACHED_KEYS = ("features", "trunk")  # batch keys of cached encoder output (``CachedFeatureDataset``)
datasets.disable_progress_bars()


def choose_captions(ids: list[list[int]], k: int, train: bool) -> list[list[int]]:
    """Training: a random k of the image's captions (with replacement if it has fewer);
    evaluation: the first k, cycling."""
    if train:
        pick = torch.randperm(len(ids)) if len(ids) >= k else torch.randint(len(ids), (k,))
        return [ids[j] for j in pick[:k].tolist()]
    return [ids[j % len(ids)] for j in range(k)]


class CaptionImageDataset(Dataset):
    def __init__(self, table: datasets.Dataset, transform, captions_per_image: int, train: bool,
                 skip_bad_images: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.table, self.transform, self.k, self.train = table, transform, captions_per_image, train
        self.skip_bad_images, self.max_pixels = skip_bad_images, max_pixels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict | None:
        row = self.table[i]
        try:
            image = self.transform(load_image(row["path"], self.max_pixels))
        except ImageLoadError as e:
            if not self.skip_bad_images:
                raise
            log.warning("skipping bad image: %s", e)
            return None
        return {"image": image, "captions": choose_captions(row["input_ids"], self.k, self.train),
                "image_id": row["image_id"]}


class CachedFeatureDataset(Dataset):
    """Like ``CaptionImageDataset``, with cached encoder output instead of the image: under
    ``key`` "features" the encoder's features (R, C), under "trunk" the map (C', h, w) of the
    frozen trunk that a fine-tuning run's trainable blocks continue from."""

    def __init__(self, table: datasets.Dataset, cache: FeatureCache, captions_per_image: int,
                 train: bool, key: str = "features"):
        self.table, self.cache, self.k, self.train = table, cache, captions_per_image, train
        self.key = key

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict | None:
        if not self.cache.valid[i]:  # an unreadable image, skipped at extraction
            return None
        row = self.table[i]
        return {self.key: self.cache[i],
                "captions": choose_captions(row["input_ids"], self.k, self.train),
                "image_id": row["image_id"]}

    def __getitems__(self, indices: list[int]) -> list[dict | None]:
        """A whole batch (the DataLoader's batched fetch): one read of the cache for all its
        rows, one slice of the caption table; the same items as ``__getitem__`` one by one."""
        indices = [int(i) for i in indices]
        valid = self.cache.valid[indices]
        keep = [i for i, ok in zip(indices, valid) if ok]
        if not keep:
            return [None] * len(indices)
        feats = self.cache.rows(keep)  # (n, R, C) or (n, C', h, w)
        rows = self.table[keep]  # columns for all kept rows at once
        items = iter([{self.key: feats[j],
                       "captions": choose_captions(ids, self.k, self.train),
                       "image_id": image_id}
                      for j, (ids, image_id) in enumerate(zip(rows["input_ids"], rows["image_id"]))])
        return [next(items) if ok else None for ok in valid]


class PadCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict | None]) -> dict:
        kept = [x for x in items if x is not None]  # None: a skipped bad image
        skipped, items = len(items) - len(kept), kept
        k = len(items[0]["captions"]) if items else 0
        T = max((len(c) for x in items for c in x["captions"]), default=1)
        captions = torch.full((len(items), k, T), self.pad_id, dtype=torch.long)  # (B, k, T)
        for b, x in enumerate(items):
            for j, c in enumerate(x["captions"]):
                captions[b, j, : len(c)] = torch.tensor(c)
        batch = {"captions": captions,
                 "image_ids": torch.tensor([x["image_id"] for x in items], dtype=torch.long),
                 "num_skipped": skipped}  # counted per epoch by training/skipped_images.py
        cached = [key for key in CACHED_KEYS if items and key in items[0]]
        if cached:  # features (B, R, C) or trunk maps (B, C', h, w)
            batch[cached[0]] = torch.stack([x[cached[0]] for x in items])
        else:
            batch["images"] = torch.stack([x["image"] for x in items]) if items else torch.empty(0)
        return batch


class CaptionDataModule(L.LightningDataModule):
    """Args:
        splits: ``{train|val|test: {annotations, images, format: coco|karpathy, split}}``.
            A split may also carry ``fractions`` ({split: share}) and ``seed``: only the images
            that ``data/folder.split_by_hash`` assigns to this split are kept (e.g. COCO's
            val2017 split into val and test).
        synthetic: generator parameters; when set, ``prepare_data`` writes the embedded set
            into ``root`` (once; it is deterministic and idempotent).
        folder: ``{captions, out_dir, fractions, seed}`` for a user's folder of images: when set,
            ``prepare_data`` converts the captions file to COCO JSON per split in ``out_dir``
            (``data/folder.py``).
        captions_per_image: captions per image in a training batch (and eval loss).
        skip_bad_images: count and skip unreadable images instead of failing.
        cache_features: serve ``batch["features"]`` (B, R, C) from a disk cache of the frozen
            encoder's features instead of images. The encoder is the one given to ``set_encoder``
            (``train.py`` and ``evaluate.py`` give the model's); without one the loaders serve
            images as usual. A CNN that fine-tunes only its last blocks caches its frozen trunk
            instead: ``batch["trunk"]`` (B, C', h, w), and the training step runs the rest.
        cache_dir: where cache entries live (one folder per encoder + transform + image list).
        cache_dtype: float32, or float16 for half the disk and page cache.
        cache_batch_size: images per feature-extraction batch.
        image_size: the square size images are resized to for encoders that take any size
            (CNNs); encoders with a fixed input size (vision transformers) use theirs. None: the
            encoder's own. The rest of the preprocessing is the encoder's (``set_preprocess``).
    """

    def __init__(
        self,
        splits: dict,
        root: str | None = None,
        synthetic: dict | None = None,
        folder: dict | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        captions_per_image: int = 5,
        max_caption_length: int = 30,
        min_word_frequency: int = 1,
        max_vocab_size: int | None = None,
        augment: bool = False,
        skip_bad_images: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_features: bool = False,
        cache_dir: str = "feature_cache",
        cache_dtype: str = "float32",
        cache_batch_size: int = 16,
    ):
        super().__init__()
        if cache_features and augment:
            raise ValueError("data.augment=true changes every epoch's images: it cannot be used "
                             "with data.cache_features=true")
        self.cache_features, self.cache_dir, self.cache_dtype = cache_features, cache_dir, cache_dtype
        self.cache_batch_size = cache_batch_size
        self.encoder, self.inference = None, False  # ``set_encoder``
        self.declared_preprocess = None  # the encoder's, from set_preprocess
        self.splits, self.root, self.synthetic, self.folder = dict(splits), root, synthetic, folder
        self.image_size, self.augment = image_size, augment
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.k = num_workers, captions_per_image
        self.max_caption_length = max_caption_length
        self.min_word_frequency, self.max_vocab_size = min_word_frequency, max_vocab_size
        self.skip_bad_images, self.max_pixels = skip_bad_images, max_pixels
        self.tokenizer = None
        self.records: dict[str, list[ImageCaptions]] = {}
        self.tables: dict[str, datasets.Dataset] = {}
        self.num_missing_images = 0

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from captioner.data.synthetic import generate

            generate(self.root, **self.synthetic)
        if self.folder is not None:
            prepare_folder(self.root, **self.folder)

    def _records(self, split: str) -> list[ImageCaptions]:
        if split not in self.records:
            if split not in self.splits:
                raise CaptionDataError(f"data.splits has no {split!r} split (has {sorted(self.splits)})")
            spec = dict(self.splits[split])
            spec.setdefault("split", split)
            fractions, seed = spec.pop("fractions", None), spec.pop("seed", 0)
            records = read_split(**spec)
            if fractions is not None:
                # by file name, not the absolute path: the same split on every machine
                split_of = split_by_hash([Path(r.path).name for r in records], dict(fractions), seed)
                records = [r for r in records if split_of[Path(r.path).name] == split]
            missing = [r for r in records if not os.path.isfile(r.path)]
            if missing and not self.skip_bad_images:
                raise ImageLoadError(
                    f"{missing[0].path}: image file not found (named in {spec['annotations']}; "
                    f"{len(missing)} missing in split {split!r}; data.skip_bad_images=true skips them)"
                )
            if missing:
                log.warning("split %s: skipping %d missing images", split, len(missing))
                self.num_missing_images += len(missing)
                records = [r for r in records if os.path.isfile(r.path)]
            self.records[split] = records
        return self.records[split]

    def set_tokenizer(self, tokenizer) -> None:
        """Use a given tokenizer (a checkpoint's) instead of training one."""
        self.tokenizer = tokenizer
        self.tables.clear()

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            captions = [c for r in self._records("train") for c in r.captions]
            self.tokenizer = train_tokenizer(captions, self.min_word_frequency, self.max_vocab_size)

    def table(self, split: str) -> datasets.Dataset:
        """The split's caption table, tokenised once with ``datasets.map``."""
        if split not in self.tables:
            records = self._records(split)
            table = datasets.Dataset.from_dict({
                "image_id": [r.image_id for r in records],
                "path": [r.path for r in records],
                "captions": [r.captions for r in records],
            })
            tok, L_max = self.tokenizer, self.max_caption_length
            self.tables[split] = table.map(
                lambda b: {"input_ids": [encode(tok, caps, L_max) for caps in b["captions"]]},
                batched=True, keep_in_memory=True,
            )
        return self.tables[split]

    def references(self, split: str) -> dict[int, list[str]]:
        return {r.image_id: r.captions for r in self._records(split)}

    def workers(self) -> int:
        """Loader worker processes: ``num_workers``, or (None) the cores left beside torch's
        compute threads, so decoding images never oversubscribes a small machine."""
        if self.num_workers is not None:
            return self.num_workers
        return auto_workers(torch.get_num_threads())

    def extract_workers(self) -> int:
        """Image-decoding processes while extracting features: ``num_workers``, or (None) only
        cores the compute threads leave free. Decoding a photo costs ~2 ms against ~35 ms of
        encoder, so a worker that takes a core from the encoder's threads costs more than it
        saves (benchmarks/bench_extract.py)."""
        if self.num_workers is not None:
            return self.num_workers
        return spare_cores(torch.get_num_threads())

    def set_preprocess(self, declared: dict | None) -> None:
        """Feed images as the encoder declares (``encoder.preprocess``, or a checkpoint's stored
        ``preprocess``); None: ImageNet statistics at ``image_size`` (the behaviour before
        encoders declared theirs)."""
        self.declared_preprocess = declared

    @property
    def preprocess(self) -> dict:
        """The preprocessing the loaders apply (fixed size; stored in checkpoints)."""
        return resolve_preprocess(self.declared_preprocess, self.image_size)

    def transform(self, train: bool = False):
        return build_transform(self.image_size, train=train, augment=self.augment,
                               preprocess=self.declared_preprocess)

    def set_encoder(self, encoder, inference: bool = False) -> None:
        """The model's encoder, whose features ``cache_features`` serves (frozen; or, when it
        fine-tunes its last blocks, its frozen trunk's maps: ``_cache_encoder``). ``inference``:
        nothing will train it (evaluation), so a fine-tuned encoder's features may be cached too
        (the cache key hashes its weights)."""
        self.encoder, self.inference = encoder, inference

    def _cache_encoder(self) -> torch.nn.Module | None:
        """What to cache. A frozen encoder (or any, when only evaluating) caches its features;
        one that fine-tunes its last blocks caches its frozen trunk's maps (served under the
        batch key ``trunk``), and the training step runs the trainable blocks on them."""
        encoder = self.encoder
        if encoder is None or self.inference or not (
                getattr(encoder, "trainable", True)
                or any(p.requires_grad for p in encoder.parameters())):
            return encoder
        if getattr(encoder, "trunk_blocks", None) == getattr(encoder, "num_blocks", -1):
            return encoder  # trainable_layers=0: no block ever trains
        trunk = encoder.frozen_trunk() if hasattr(encoder, "frozen_trunk") else None
        if trunk is None:
            raise ValueError(
                "data.cache_features=true needs a frozen encoder, or a torchvision or "
                "EfficientNet-Lite CNN that trains only its last blocks "
                "(model.encoder.trainable_layers=N): set model.encoder.trainable=false, or "
                "data.cache_features=false")
        return trunk

    def features(self, split: str) -> FeatureCache | None:
        """The split's cached encoder features, or frozen-trunk maps (``_cache_encoder``),
        extracted on first use; None without an encoder to extract them with."""
        encoder = self._cache_encoder()
        if encoder is None:
            log.info("data.cache_features: no encoder attached, serving images")
            return None
        return cached_features(
            encoder, self.table(split)["path"], self.transform(), self.cache_dir,
            name=split, dtype=self.cache_dtype, batch_size=self.cache_batch_size,
            num_workers=self.extract_workers(), max_pixels=self.max_pixels,
            skip_bad_images=self.skip_bad_images,
        )

    def dataloader(self, split: str, train: bool = False) -> DataLoader:
        cache = self.features(split) if self.cache_features else None
        if cache is not None:  # a trunk entry's key names where its encoder stops
            key = "trunk" if "trunk_blocks" in cache.meta["encoder"] else "features"
            ds = CachedFeatureDataset(self.table(split), cache, self.k, train, key=key)
        else:
            transform = self.transform(train=train)
            ds = CaptionImageDataset(self.table(split), transform, self.k, train,
                                     self.skip_bad_images, self.max_pixels)
        # Cached features need no worker processes: a batch is one read of a memory-mapped file
        # (page cache after the first epoch), far cheaper than forking workers and shipping
        # every batch back through shared memory.
        workers = 0 if cache is not None else self.workers()
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=train,
            num_workers=workers, collate_fn=PadCollate(self.tokenizer.pad_token_id),
            persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
