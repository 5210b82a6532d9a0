"""A user's own folder of images + one captions file -> COCO caption JSON per split.

The captions file is JSON lines (``{"file_name": ..., "caption": ...}`` per line) or CSV with
``file_name`` and ``caption`` columns, one row per caption (an image may have several rows),
read with Hugging Face ``datasets``. ``file_name`` is relative to the folder.

Splits are deterministic: images are ordered by a hash of ``seed`` and their file name and cut by
``fractions`` (exact counts, rounded; a split with a non-zero fraction that rounds to no image
takes one from the largest split). The same rule, ``split_by_hash``, splits one COCO split into two
(e.g. COCO val2017 into val + test, as COCO has no public test captions).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from captioner.data.captions import CaptionDataError, safe_image_path
from captioner.utils.io import atomic_write_json

log = logging.getLogger(__name__)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def split_by_hash(names: list[str], fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """{name: split}. Order by sha1(f"{seed}:{name}"), then give each split its share in the
    order of ``fractions`` (exact counts; the largest split takes the rounding remainder)."""
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise CaptionDataError(f"split fractions must be non-negative with a positive sum: {fractions}")
    total = sum(fractions.values())
    order = sorted(set(names), key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).hexdigest())
    counts = {s: round(len(order) * f / total) for s, f in fractions.items()}
    counts[max(counts, key=counts.get)] += len(order) - sum(counts.values())  # rounding remainder
    for s, f in fractions.items():  # a wanted split that rounded to nothing takes one image
        biggest = max(counts, key=counts.get)
        if f > 0 and counts[s] == 0 and counts[biggest] > 1:
            counts[s], counts[biggest] = 1, counts[biggest] - 1
    out, start = {}, 0
    for s, n in counts.items():
        for name in order[start : start + n]:
            out[name] = s
        start += n
    return out


def _check_utf8(path: Path) -> None:
    """Name the line of a captions file that is not UTF-8 (the parsers' errors name neither)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CaptionDataError(f"{path}: line {n}: not UTF-8 text (byte {line[e.start]:#04x} "
                                       f"at column {e.start + 1}); save the file as UTF-8") from None


def read_caption_table(path: str | Path) -> dict[str, list[str]]:
    """{file_name: [captions]} from a JSON-lines or CSV file, in first-seen order."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise CaptionDataError(f"{path}: captions file not found (JSON lines or CSV with "
                               "file_name, caption)")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise CaptionDataError(f"{path}: unknown captions format {path.suffix!r} (.jsonl or .csv)")
    _check_utf8(path)
    try:
        table = datasets.Dataset.from_json(str(path), keep_in_memory=True) if kind == "json" else \
            datasets.Dataset.from_csv(str(path), keep_in_memory=True)
    except Exception as e:  # datasets wraps parser errors in several types
        raise CaptionDataError(f"{path}: not readable as {kind} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    missing = {"file_name", "caption"} - set(table.column_names)
    if missing:
        raise CaptionDataError(f"{path}: lacks column(s) {sorted(missing)} (has {table.column_names})")
    captions: dict[str, list[str]] = {}
    for i, (name, caption) in enumerate(zip(table["file_name"], table["caption"])):
        if not isinstance(name, str) or not name.strip():
            raise CaptionDataError(f"{path}: row {i}: invalid file_name {name!r}")
        if not isinstance(caption, str):
            raise CaptionDataError(f"{path}: row {i}: caption is not text: {caption!r}")
        if caption.strip():
            captions.setdefault(name.strip(), []).append(caption.strip())
    if not captions:
        raise CaptionDataError(f"{path}: no captions")
    return captions


def prepare_folder(root: str | Path, captions: str | Path, out_dir: str | Path,
                   fractions: dict[str, float], seed: int = 0) -> dict[str, Path]:
    """Write ``{out_dir}/captions_{split}.json`` (COCO caption format, ``file_name`` relative to
    ``root``) for every split; image ids number the images in sorted file-name order. Returns
    {split: annotation path}. Rewritten each call (cheap), atomically."""
    root, out_dir = Path(root), Path(out_dir)
    table = read_caption_table(captions)
    for name in table:
        safe_image_path(root, name, Path(captions))  # refuses names escaping the folder
    names = sorted(table)
    ids = {n: i + 1 for i, n in enumerate(names)}
    split_of = split_by_hash(names, dict(fractions), seed)
    written = {}
    for split in fractions:
        chosen = [n for n in names if split_of[n] == split]
        images = [{"id": ids[n], "file_name": n} for n in chosen]
        anns = [{"id": 0, "image_id": ids[n], "caption": c} for n in chosen for c in table[n]]
        for j, a in enumerate(anns):
            a["id"] = j + 1
        written[split] = out_dir / f"captions_{split}.json"
        atomic_write_json(written[split], {"images": images, "annotations": anns})
    log.info("folder %s: %s images per split", root,
             {s: sum(v == s for v in split_of.values()) for s in fractions})
    return written
