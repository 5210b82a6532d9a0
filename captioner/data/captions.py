"""Caption annotation formats -> one list of ``ImageCaptions`` records.

Supported: COCO caption JSON (``images`` + ``annotations``) and Karpathy split JSON
(``dataset_coco.json`` / ``dataset_flickr8k.json``: ``images`` with ``split``, ``filename``,
optional ``filepath``, ``sentences[].raw``). Every problem is a ``CaptionDataError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class CaptionDataError(ValueError):
    """Bad caption data; the message names the file (and the key or record)."""


@dataclass
class ImageCaptions:
    image_id: int
    path: str  # absolute image path, inside the image root
    captions: list[str] = field(default_factory=list)


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaptionDataError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise CaptionDataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise CaptionDataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def safe_image_path(root: Path, file_name, source: Path) -> str:
    """Join ``file_name`` to ``root``, refusing names that escape it (``../``, absolute paths)."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise CaptionDataError(f"{source}: invalid file_name {file_name!r}")
    root = root.resolve()
    path = (root / file_name).resolve()
    if Path(file_name).is_absolute() or not path.is_relative_to(root):
        raise CaptionDataError(f"{source}: file_name {file_name!r} escapes the image root {root}")
    return str(path)


def _clean(caption, source: Path, where: str, max_words: int) -> str | None:
    if not isinstance(caption, str):
        raise CaptionDataError(f"{source}: {where}: caption is not a string: {caption!r}")
    caption = " ".join(caption.split())
    if not caption:
        return None  # empty / whitespace captions are dropped
    return " ".join(caption.split(" ")[:max_words])


def read_coco(annotations: str | Path, images: str | Path, max_words: int = 100) -> list[ImageCaptions]:
    path = Path(annotations)
    doc = _load_json(path)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise CaptionDataError(f"{path}: not COCO caption JSON (needs 'images' and 'annotations')")
    records: dict[int, ImageCaptions] = {}
    for i, img in enumerate(doc["images"]):
        try:
            image_id, file_name = img["id"], img["file_name"]
        except (KeyError, TypeError) as e:
            raise CaptionDataError(f"{path}: images[{i}] lacks key {e}") from None
        if image_id in records:
            raise CaptionDataError(f"{path}: duplicate image id {image_id}")
        records[image_id] = ImageCaptions(image_id, safe_image_path(Path(images), file_name, path))
    for i, ann in enumerate(doc["annotations"]):
        try:
            image_id, caption = ann["image_id"], ann["caption"]
        except (KeyError, TypeError) as e:
            raise CaptionDataError(f"{path}: annotations[{i}] lacks key {e}") from None
        if image_id not in records:
            raise CaptionDataError(f"{path}: annotations[{i}] names unknown image id {image_id}")
        caption = _clean(caption, path, f"annotations[{i}]", max_words)
        if caption:
            records[image_id].captions.append(caption)
    return list(records.values())


def read_karpathy(
    annotations: str | Path, images: str | Path, split: str, max_words: int = 100
) -> list[ImageCaptions]:
    """``split``: train (includes Karpathy's ``restval``), val or test."""
    path = Path(annotations)
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CaptionDataError(f"{path}: not a Karpathy split JSON (needs an 'images' list)")
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    records, seen = [], set()
    for i, img in enumerate(doc["images"]):
        try:
            if img["split"] not in wanted:
                continue
            name = str(Path(img.get("filepath", "")) / img["filename"])
            image_id = img.get("cocoid", img.get("imgid", i))
            sentences = img["sentences"]
        except (KeyError, TypeError) as e:
            raise CaptionDataError(f"{path}: images[{i}] lacks key {e}") from None
        if image_id in seen:
            raise CaptionDataError(f"{path}: duplicate image id {image_id}")
        seen.add(image_id)
        rec = ImageCaptions(image_id, safe_image_path(Path(images), name, path))
        for j, s in enumerate(sentences):
            raw = s.get("raw", " ".join(s.get("tokens", []))) if isinstance(s, dict) else s
            caption = _clean(raw, path, f"images[{i}].sentences[{j}]", max_words)
            if caption:
                rec.captions.append(caption)
        records.append(rec)
    return records


def read_split(
    annotations: str, images: str, format: str = "coco", split: str | None = None,
    max_words: int = 100,
) -> list[ImageCaptions]:
    """One split from its config: ``{annotations, images, format, split}``. Images without any
    caption are dropped; an empty split is an error."""
    if format == "coco":
        records = read_coco(annotations, images, max_words)
    elif format == "karpathy":
        if split is None:
            raise CaptionDataError(f"{annotations}: Karpathy format needs the split name")
        records = read_karpathy(annotations, images, split, max_words)
    else:
        raise CaptionDataError(f"unknown caption format {format!r} (coco or karpathy)")
    records = [r for r in records if r.captions]
    if not records:
        raise CaptionDataError(f"{annotations}: no image with a caption" + (f" in split {split!r}" if split else ""))
    return records
