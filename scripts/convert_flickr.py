"""Convert Flickr8k / Flickr30k captions into COCO caption JSON, one file per split.

Captions come from a token file (``Flickr8k.token.txt``, Flickr30k's ``results_20130124.token``),
one caption a line::

    1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress is climbing up a set of stairs .

or, when no token file is given, from a Karpathy split JSON's ``sentences[].raw``.

Splits come from, in this order of preference:

* the official split files, ``--split train=Flickr_8k.trainImages.txt --split val=... ``
  (one image file name a line; any split names may be used);
* a Karpathy split JSON, ``--karpathy dataset_flickr8k.json`` (``restval`` images go to
  ``train`` unless ``--restval`` says otherwise);
* otherwise every captioned image goes into one ``all`` split.

Writes ``OUT/captions_{split}.json``: ``{"info", "images": [{"id", "file_name"[, "width",
"height"]}], "annotations": [{"id", "image_id", "caption"}]}``. ``file_name`` is the image's
file name (prefixed by ``--image-prefix``), relative to the images directory. Image ids are the
1-based rank of the file name among all captioned images, annotation ids the rank of the
caption among all captions (images sorted by name, captions by their ``#N``), so they are
unique across splits and do not depend on how the images are split. With ``--images DIR`` the
image sizes are read from the files and images missing there are skipped. Each file is written
atomically (temporary file + ``os.replace``).

Example::

    python scripts/convert_flickr.py --tokens Flickr8k.token.txt --out data/flickr8k/annotations \\
        --split train=Flickr_8k.trainImages.txt --split val=Flickr_8k.devImages.txt \\
        --split test=Flickr_8k.testImages.txt --image-prefix Flicker8k_Dataset/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConversionError(ValueError):
    """Bad input; the message names the file (and line)."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _read_lines(path: Path):
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConversionError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return text.splitlines()


def read_tokens(path) -> dict[str, list[str]]:
    """Token file -> {image file name: captions in ``#N`` order}."""
    path = Path(path)
    found: dict[str, dict[int, str]] = {}
    for lineno, raw in enumerate(_read_lines(path), 1):
        line = raw.strip(" \r\n")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if "\t" not in line:
            raise ConversionError(
                f"{where}: expected 'IMAGE#N<TAB>caption', found no tab in {line[:80]!r}")
        key, caption = line.split("\t", 1)
        key = key.strip()
        caption = " ".join(caption.split())
        name, sep, idx = key.rpartition("#")
        if not sep or not name or not idx.isdigit():
            raise ConversionError(
                f"{where}: expected 'IMAGE#N' before the tab (N a caption number), got {key!r}")
        if not caption:
            raise ConversionError(f"{where}: empty caption for {key!r}")
        caps = found.setdefault(name, {})
        n = int(idx)
        if n in caps:
            raise ConversionError(f"{where}: duplicate caption number {key!r}")
        caps[n] = caption
    if not found:
        raise ConversionError(f"{path}: no captions found")
    return {name: [caps[n] for n in sorted(caps)] for name, caps in found.items()}


def read_split_file(path) -> list[str]:
    """Official split file -> image file names (in file order, duplicates dropped)."""
    path = Path(path)
    names: list[str] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(_read_lines(path), 1):
        name = raw.strip()
        if not name:
            continue
        if len(name.split()) != 1:
            raise ConversionError(
                f"{path}:{lineno}: expected one image file name a line, got {name[:80]!r}")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def read_karpathy(path, restval: str = "train") -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Karpathy split JSON -> ({split: file names}, {file name: raw captions}).

    ``restval`` images go to the split named by ``restval`` ("skip" drops them)."""
    path = Path(path)
    try:
        doc = json.loads("\n".join(_read_lines(path)))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ConversionError(f"{path}: expected an object with an 'images' list")
    splits: dict[str, list[str]] = {}
    captions: dict[str, list[str]] = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("filename"), str) \
                or not isinstance(im.get("split"), str):
            raise ConversionError(
                f"{path}: images[{i}]: expected an object with string 'filename' and 'split'")
        name = im["filename"]
        split = im["split"]
        if split == "restval":
            if restval == "skip":
                continue
            split = restval
        splits.setdefault(split, []).append(name)
        sents = im.get("sentences", [])
        raws = []
        for j, s in enumerate(sents if isinstance(sents, list) else []):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str):
                raise ConversionError(f"{path}: images[{i}].sentences[{j}]: no string 'raw'")
            raw = " ".join(raw.split())
            if raw:
                raws.append(raw)
        captions[name] = raws
    return splits, captions


def _image_size(images_dir: Path, name: str) -> tuple[int, int] | None:
    from PIL import Image  # only needed with --images

    try:
        with Image.open(images_dir / name) as im:
            return im.size
    except (OSError, ValueError):
        return None


def write_json_atomic(doc, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def convert(out, tokens=None, splits: dict[str, str | os.PathLike] | None = None,
            karpathy=None, image_prefix: str = "", images_dir=None, restval: str = "train",
            dataset_name: str = "Flickr") -> dict[str, Path]:
    """Write ``out/captions_{split}.json`` for every split; return {split: path}."""
    if tokens is None and karpathy is None:
        raise ConversionError("need a token file (--tokens) or a Karpathy JSON (--karpathy)")
    out = Path(out)
    captions = read_tokens(tokens) if tokens is not None else None
    source = str(tokens) if tokens is not None else str(karpathy)

    members: dict[str, list[str]]
    if splits:
        members = {}
        for name, p in splits.items():
            if not _SPLIT_NAME.match(name):
                raise ConversionError(f"bad split name {name!r} (letters, digits, _ . - only)")
            members[name] = read_split_file(p)
        owner: dict[str, str] = {}
        for name, files in members.items():
            for f in files:
                if f in owner:
                    raise ConversionError(
                        f"{splits[name]}: image {f!r} is also in split {owner[f]!r} "
                        f"({splits[owner[f]]})")
                owner[f] = name
        split_source = {name: str(p) for name, p in splits.items()}
    elif karpathy is not None:
        members, k_captions = read_karpathy(karpathy, restval)
        if captions is None:
            captions = k_captions
        split_source = {name: str(karpathy) for name in members}
    else:
        members = {"all": sorted(captions)}
        split_source = {"all": source}
    assert captions is not None

    # ids: rank among all captioned images / all captions; independent of the split choice
    ordered = sorted(name for name, caps in captions.items() if caps)
    image_ids = {name: i + 1 for i, name in enumerate(ordered)}
    first_ann: dict[str, int] = {}
    next_id = 1
    for name in ordered:
        first_ann[name] = next_id
        next_id += len(captions[name])

    images_dir = Path(images_dir) if images_dir is not None else None
    written: dict[str, Path] = {}
    for split, files in members.items():
        no_caps = [f for f in files if f not in image_ids]
        if no_caps:
            _warn(f"{len(no_caps)} image(s) of split {split!r} ({split_source[split]}) have no "
                  f"captions in {source}, skipped (first: {no_caps[0]})")
        images, annotations, missing = [], [], []
        for f in files:
            if f not in image_ids:
                continue
            entry = {"id": image_ids[f], "file_name": f"{image_prefix}{f}"}
            if images_dir is not None:
                size = _image_size(images_dir, entry["file_name"])
                if size is None:
                    missing.append(f)
                    continue
                entry["width"], entry["height"] = size
            images.append(entry)
            for k, c in enumerate(captions[f]):
                annotations.append({"id": first_ann[f] + k, "image_id": image_ids[f],
                                    "caption": c})
        if missing:
            _warn(f"{len(missing)} image(s) of split {split!r} are missing or unreadable in "
                  f"{images_dir}, skipped (first: {missing[0]})")
        if not images:
            _warn(f"split {split!r} has no captioned images")
        doc = {
            "info": {"description": f"{dataset_name} captions, split {split!r}",
                     "captions_source": source, "split_source": split_source[split],
                     "converter": "scripts/convert_flickr.py"},
            "images": images,
            "annotations": annotations,
        }
        path = out / f"captions_{split}.json"
        write_json_atomic(doc, path)
        written[split] = path
        print(f"{split}: {len(images)} images, {len(annotations)} captions -> {path}")
    unassigned = len(set(image_ids) - {f for files in members.values() for f in files})
    if unassigned and (splits or karpathy is not None):
        print(f"note: {unassigned} captioned image(s) are in no split")
    return written


def _split_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Convert Flickr8k/Flickr30k captions to COCO caption JSON, one file per "
                    "split (OUT/captions_{split}.json).",
        epilog="Split source: --split files if given, else --karpathy, else one 'all' split.")
    p.add_argument("--tokens", type=Path,
                   help="token file: IMAGE#N<TAB>caption lines (Flickr8k.token.txt, "
                        "results_20130124.token); if omitted, captions come from --karpathy")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--split", type=_split_arg, action="append", default=[],
                   metavar="NAME=PATH",
                   help="official split file, one image name a line (repeatable), "
                        "e.g. train=Flickr_8k.trainImages.txt")
    p.add_argument("--karpathy", type=Path,
                   help="Karpathy split JSON (dataset_flickr8k.json); used for the splits "
                        "when no --split is given")
    p.add_argument("--restval", default="train",
                   help="split for Karpathy 'restval' images, or 'skip' (default: train)")
    p.add_argument("--image-prefix", default="",
                   help="prefix of every file_name, e.g. 'Flicker8k_Dataset/'")
    p.add_argument("--images", type=Path,
                   help="images directory: record width/height, skip images missing there")
    p.add_argument("--name", default="Flickr", help="dataset name for the info block")
    a = p.parse_args(argv)
    if a.tokens is None and a.karpathy is None:
        p.error("need --tokens or --karpathy")
    splits: dict[str, str] = {}
    for name, path in a.split:
        if name in splits:
            p.error(f"split {name!r} given twice")
        splits[name] = path
    try:
        convert(a.out, tokens=a.tokens, splits=splits or None, karpathy=a.karpathy,
                image_prefix=a.image_prefix, images_dir=a.images, restval=a.restval,
                dataset_name=a.name)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
