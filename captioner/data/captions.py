"""Caption annotation formats -> one list of ``ImageCaptions`` records.

Supported: COCO caption JSON (``images`` + ``annotations``) and Karpathy split JSON
(``dataset_coco.json`` / ``dataset_flickr8k.json``: ``images`` with ``split``, ``filename``,
optional ``filepath``, ``sentences[].raw``). Every problem is a ``CaptionDataError`` naming the file
and the record, never another exception: ids must be integers (they become tensor entries),
file names must stay inside the image root, captions must be text. Whitespace is collapsed,
empty captions are dropped, and captions longer than ``max_words`` (default 100) words keep
their first ``max_words`` words.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from captioner.utils.errors import InputError

log = logging.getLogger(__name__)
INT64 = 2**63


class CaptionDataError(InputError, ValueError):
    """Bad caption data; the message names the file (and the key or record)."""


@dataclass
class ImageCaptions:
    image_id: int
    path: str  # absolute image path, inside the image root
    captions: list[str] = field(default_factory=list)


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            return json.load(f)
    except FileNotFoundError:
        raise CaptionDataError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise CaptionDataError(f"{path}: is a directory, not an annotation file") from None
    except UnicodeDecodeError as e:
        raise CaptionDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CaptionDataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise CaptionDataError(f"{path}: malformed JSON (nested too deeply)") from None
    except OSError as e:
        raise CaptionDataError(f"{path}: cannot read annotation file ({e.strerror})") from None


def _record(doc, i: int, source: Path, where: str) -> dict:
    if not isinstance(doc, dict):
        raise CaptionDataError(f"{source}: {where}[{i}] is not an object: {str(doc)[:80]!r}")
    return doc


def _field(record: dict, key: str, source: Path, where: str):
    try:
        return record[key]
    except KeyError:
        raise CaptionDataError(f"{source}: {where} lacks key {key!r}") from None


def _image_id(value, source: Path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -INT64 <= value < INT64:
        raise CaptionDataError(f"{source}: {where}: image id must be a 64-bit integer, got {str(value)[:80]!r}")
    return value


def _text(value, source: Path, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise CaptionDataError(f"{source}: {where}: {what} is not a string: {str(value)[:80]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape of a lone surrogate: not text
        raise CaptionDataError(f"{source}: {where}: {what} is not valid Unicode text") from None
    return value


def safe_image_path(root: Path, file_name, source: Path) -> str:
    """Join ``file_name`` to ``root``, refusing names that escape it (``../``, absolute paths,
    symlinks pointing out)."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise CaptionDataError(f"{source}: invalid file_name {str(file_name)[:80]!r}")
    try:
        root = root.resolve()
        path = (root / file_name).resolve()
    except (OSError, ValueError) as e:  # NUL bytes, unencodable names, names too long
        raise CaptionDataError(f"{source}: invalid file_name {file_name[:80]!r} ({e})") from None
    if Path(file_name).is_absolute() or not path.is_relative_to(root):
        raise CaptionDataError(f"{source}: file_name {file_name[:80]!r} escapes the image root {root}")
    return str(path)


def _clean(caption, source: Path, where: str, max_words: int) -> str | None:
    caption = " ".join(_text(caption, source, where, "caption").split())
    if not caption:
        return None  # empty / whitespace captions are dropped
    return " ".join(caption.split(" ")[:max_words])


def read_coco(annotations: str | Path, images: str | Path, max_words: int = 100) -> list[ImageCaptions]:
    path = Path(annotations)
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise CaptionDataError(f"{path}: not COCO caption JSON (needs 'images' and 'annotations' lists)")
    records: dict[int, ImageCaptions] = {}
    for i, img in enumerate(doc["images"]):
        where = f"images[{i}]"
        img = _record(img, i, path, "images")
        image_id = _image_id(_field(img, "id", path, where), path, where)
        file_name = _field(img, "file_name", path, where)
        if image_id in records:
            raise CaptionDataError(f"{path}: duplicate image id {image_id} ({where})")
        records[image_id] = ImageCaptions(image_id, safe_image_path(Path(images), file_name, path))
    for i, ann in enumerate(doc["annotations"]):
        where = f"annotations[{i}]"
        ann = _record(ann, i, path, "annotations")
        image_id = _field(ann, "image_id", path, where)
        caption = _field(ann, "caption", path, where)
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id not in records:
            raise CaptionDataError(f"{path}: {where} names unknown image id {str(image_id)[:80]}")
        caption = _clean(caption, path, where, max_words)
        if caption:
            records[image_id].captions.append(caption)
    return list(records.values())


def _karpathy_sentence(s, source: Path, where: str):
    """A sentence is ``{"raw": str}``, ``{"tokens": [str]}`` or a plain string."""
    if isinstance(s, dict):
        if "raw" in s:
            return s["raw"]
        tokens = _field(s, "tokens", source, where)
        if not isinstance(tokens, list):
            raise CaptionDataError(f"{source}: {where}: 'tokens' is not a list")
        return " ".join(_text(t, source, where, "token") for t in tokens)
    return s


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
        where = f"images[{i}]"
        img = _record(img, i, path, "images")
        if _text(_field(img, "split", path, where), path, where, "split") not in wanted:
            continue
        filepath = _text(img.get("filepath", ""), path, where, "filepath")
        filename = _text(_field(img, "filename", path, where), path, where, "filename")
        image_id = _image_id(img.get("cocoid", img.get("imgid", i)), path, where)
        sentences = _field(img, "sentences", path, where)
        if not isinstance(sentences, list):
            raise CaptionDataError(f"{path}: {where}: 'sentences' is not a list")
        if image_id in seen:
            raise CaptionDataError(f"{path}: duplicate image id {image_id} ({where})")
        seen.add(image_id)
        name = f"{filepath}/{filename}" if filepath else filename
        rec = ImageCaptions(image_id, safe_image_path(Path(images), name, path))
        for j, s in enumerate(sentences):
            w = f"{where}.sentences[{j}]"
            caption = _clean(_karpathy_sentence(s, path, w), path, w, max_words)
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
    uncaptioned = sum(not r.captions for r in records)
    if uncaptioned:
        log.warning("%s: skipping %d images without any caption", annotations, uncaptioned)
    records = [r for r in records if r.captions]
    if not records:
        raise CaptionDataError(f"{annotations}: no image with a caption" + (f" in split {split!r}" if split else ""))
    return records


def write_coco_subset(annotations: str | Path, n: int, out: str | Path) -> Path:
    """A COCO caption file with the first ``n`` images of ``annotations`` and only their captions
    (quick benchmarks and tests on a slice of a real set). Returns ``out``."""
    from captioner.utils.io import atomic_write_json

    coco = _load_json(Path(annotations))
    images = coco["images"][:n]
    ids = {im["id"] for im in images}
    coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    atomic_write_json(out, coco)
    return Path(out)
