"""Embedded default dataset: a deterministic, COCO-format set of captioned "shape scenes".

Each image shows 1..``max_objects`` non-overlapping coloured shapes (circle, square, triangle,
cross; six well separated colours; two clearly separated sizes) on a plain light background.
Each image gets ``captions_per_image`` differently worded lower-case captions, every word of
which is grounded in what is visible: colours, shapes, sizes, counts and spatial relations
(left of / right of / above / below) that are decided from object centres with a clear margin.

The pipeline is split into three pure pieces so tests can check the grounding:

* :func:`make_scene` draws a :class:`Scene` (object list) from a ``numpy`` generator,
* :func:`render` turns a scene into a ``PIL`` RGB image,
* :func:`describe` writes distinct captions for a scene.

:func:`generate` writes the whole set (``images/{split}/NNNNNN.png`` +
``annotations/captions_{split}.json`` + ``manifest.json``, written last) atomically and
idempotently. ``python -m captioner.data.synthetic --root DIR`` does the same from a shell.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.utils.cpu import usable_cores

GENERATOR_VERSION = 1
_PARALLEL_MIN_IMAGES = 512  # below this, starting worker processes costs more than it saves

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 60, 175),
    "orange": (245, 135, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of an object, as a fraction of the image side. The ranges do not overlap
# (small objects are at most ~14 px wide on a 64 px image, large ones at least ~20 px).
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.08, 0.105), "large": (0.16, 0.20)}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Image ids are ``offset + index``: stable whatever the other splits' sizes are.
_ID_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}
_MAX_PER_SPLIT = 999_999

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: cheap anti-aliasing
_COLOR_JITTER = 12  # per-channel jitter of an object's colour
_NOISE_SIGMA = 2.0  # pixel noise
_GAP = 0.05  # minimum gap between two objects' boxes (fraction of the side)
_BORDER = 0.03  # minimum distance from an object's box to the image border
_DOMINANCE = 1.75  # |dx| >= 1.75|dy| (or vice versa) so that one relation clearly holds


# --------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # "small" or "large"
    x: float  # centre, pixels (0 = left)
    y: float  # centre, pixels (0 = top)
    r: float  # half-extent, pixels
    rgb: tuple[int, int, int]  # the exact colour drawn (palette colour + jitter)


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b``: "left", "right", "above", "below", or None when the
    displacement is not clearly along one axis (never the case inside a generated scene)."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= _DOMINANCE * abs(dy) and abs(dx) > 0:
        return "left" if dx > 0 else "right"
    if abs(dy) >= _DOMINANCE * abs(dx) and abs(dy) > 0:
        return "above" if dy > 0 else "below"
    return None


def _separated(a_xy, a_r, b_xy, b_r, gap) -> bool:
    dx, dy = abs(a_xy[0] - b_xy[0]), abs(a_xy[1] - b_xy[1])
    return dx >= a_r + b_r + gap or dy >= a_r + b_r + gap


def _clear(a_xy, b_xy) -> bool:
    dx, dy = abs(a_xy[0] - b_xy[0]), abs(a_xy[1] - b_xy[1])
    return dx >= _DOMINANCE * dy or dy >= _DOMINANCE * dx


def _num_objects(rng: np.random.Generator, max_objects: int) -> int:
    if max_objects <= 1:
        return 1
    if rng.random() < 0.1:
        return 1
    return int(rng.integers(2, max_objects + 1))


def make_scene(rng: np.random.Generator, image_size: int = 64, max_objects: int = 3) -> Scene:
    """Draw a random scene: 1..max_objects objects (mostly 2..max), distinct (colour, shape)
    pairs, no overlaps, and every pair of objects in a clear left/right/above/below relation."""
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if max_objects > len(NUMBER_WORDS) - 1:
        raise ValueError(f"max_objects must be <= {len(NUMBER_WORDS) - 1}, got {max_objects}")
    s = float(image_size)
    tint = rng.integers(-6, 7, size=3)
    base = int(rng.integers(236, 248))
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    n = _num_objects(rng, max_objects)
    while True:
        for _ in range(50):
            sizes = ["large" if rng.random() < 0.5 else "small" for _ in range(n)]
            radii = [round(float(rng.uniform(*SIZE_RANGES[z])) * s, 3) for z in sizes]
            centres: list[tuple[float, float]] = []
            for r in radii:
                lo, hi = r + _BORDER * s, s - r - _BORDER * s
                for _ in range(60):
                    c = (round(float(rng.uniform(lo, hi)), 3), round(float(rng.uniform(lo, hi)), 3))
                    if all(
                        _separated(c, r, c2, r2, _GAP * s) and _clear(c, c2)
                        for c2, r2 in zip(centres, radii)
                    ):
                        centres.append(c)
                        break
                else:
                    break
            if len(centres) == n:
                break
        else:
            n -= 1  # crowded: try with fewer objects (n == 1 always succeeds)
            continue
        break
    kinds: list[tuple[str, str]] = []
    while len(kinds) < n:
        k = (SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))])
        if k not in kinds:
            kinds.append(k)
    objects = []
    for (shape, color), size, r, (x, y) in zip(kinds, sizes, radii, centres):
        jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter))
        objects.append(SceneObject(shape, color, size, x, y, r, rgb))
    return Scene(image_size, background, tuple(objects))


# --------------------------------------------------------------------------------------------
# Rendering


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, k: int) -> None:
    x, y, r = o.x * k, o.y * k, o.r * k
    if o.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=o.rgb)
    elif o.shape == "square":
        q = r * 0.9  # same visual weight as the circle
        draw.rectangle([x - q, y - q, x + q, y + q], fill=o.rgb)
    elif o.shape == "triangle":  # apex up; the centre is inside
        draw.polygon([(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)], fill=o.rgb)
    elif o.shape == "cross":
        t = r * 0.36  # half-thickness of the arms
        draw.rectangle([x - r, y - t, x + r, y + t], fill=o.rgb)
        draw.rectangle([x - t, y - r, x + t, y + r], fill=o.rgb)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene, noise_seed: int | None = 0) -> Image.Image:
    """Scene -> RGB image of ``scene.image_size`` pixels. Adds mild Gaussian pixel noise drawn
    from ``noise_seed`` (None: no noise)."""
    k = _SUPERSAMPLE
    size = scene.image_size
    img = Image.new("RGB", (size * k, size * k), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o, k)
    img = img.reduce(k)
    if noise_seed is None or _NOISE_SIGMA <= 0:
        return img
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(noise_seed).normal(0.0, _NOISE_SIGMA, size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# Captions


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: SceneObject, rng: np.random.Generator, with_size: bool | None = None) -> str:
    """Noun phrase with article: "a large red circle", "an orange square", "a big blue cross"."""
    if with_size is None:
        with_size = rng.random() < 0.6
    words = []
    if with_size:
        words.append("small" if o.size == "small" else _choice(rng, ("large", "large", "big")))
    words += [o.color, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


_REL_WORDS = {
    "left": ("to the left of", "to the left of", "left of"),
    "right": ("to the right of", "to the right of", "right of"),
    "above": ("above", "above", "over"),
    "below": ("below", "below", "under"),
}


def _rel_phrase(rel: str, rng: np.random.Generator) -> str:
    return _choice(rng, _REL_WORDS[rel])


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _noun(rng) -> str:
    return _choice(rng, ("shapes", "shapes", "objects"))


def _picture(rng) -> str:
    return _choice(rng, ("image", "picture"))


def _background(rng) -> str:
    return _choice(rng, ("a white background", "a plain background", "a light background"))


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.x, o.y))


def _cap_single(scene, rng) -> str:
    o = scene.objects[0]
    kind = int(rng.integers(6))
    if kind == 0:
        return f"{_np(o, rng)} on {_background(rng)}"
    if kind == 1:
        return f"there is {_np(o, rng)} in the {_picture(rng)}"
    if kind == 2:
        pic = _picture(rng)
        return f"{_article(pic)} {pic} of {_np(o, rng)}"
    if kind == 3:
        return f"a single {_np(o, rng).split(' ', 1)[1]}"
    if kind == 4:
        return f"one {_np(o, rng).split(' ', 1)[1]} on {_background(rng)}"
    return f"{_np(o, rng)} alone on {_background(rng)}"


def _cap_list(scene, rng) -> str:
    phrases = [_np(o, rng) for o in _left_to_right(scene)]
    prefix = _choice(rng, ("", "", "there is ", "an image of ", "a picture of "))
    suffix = _choice(rng, ("", "", f" on {_background(rng)}"))
    return f"{prefix}{_join(phrases)}{suffix}"


def _random_pair(scene, rng) -> tuple[SceneObject, SceneObject]:
    i, j = rng.permutation(len(scene.objects))[:2]
    return scene.objects[int(i)], scene.objects[int(j)]


def _relation_clause(a, b, rng, verb: bool | None = None) -> str:
    rel = relation(a, b)
    assert rel is not None, "generated scenes only hold clear relations"
    if verb is None:
        verb = rng.random() < 0.4
    is_ = " is" if verb else ""
    return f"{_np(a, rng)}{is_} {_rel_phrase(rel, rng)} {_np(b, rng)}"


def _cap_relation(scene, rng) -> str:
    a, b = _random_pair(scene, rng)
    return _relation_clause(a, b, rng)


def _cap_count_relation(scene, rng) -> str:
    a, b = _random_pair(scene, rng)
    n = NUMBER_WORDS[len(scene.objects)]
    return f"{n} {_noun(rng)} with {_relation_clause(a, b, rng, verb=False)}"


def _cap_count(scene, rng) -> str:
    n = NUMBER_WORDS[len(scene.objects)]
    kind = int(rng.integers(3))
    if kind == 0:
        return f"{n} {_noun(rng)} on {_background(rng)}"
    if kind == 1:
        return f"there are {n} {_noun(rng)} in the {_picture(rng)}"
    return f"{n} {_noun(rng)} : {_join([_np(o, rng) for o in _left_to_right(scene)])}"


def _between(scene) -> tuple[SceneObject, SceneObject, SceneObject] | None:
    """(middle, one end, other end) when one object lies between the two others along the
    axis of both its relations, e.g. left of one and right of the other."""
    if len(scene.objects) != 3:
        return None
    for m in scene.objects:
        a, b = (o for o in scene.objects if o is not m)
        if {relation(m, a), relation(m, b)} in ({"left", "right"}, {"above", "below"}):
            return m, a, b
    return None


def _cap_between(scene, rng) -> str:
    m, a, b = _between(scene)
    if rng.random() < 0.5:
        a, b = b, a
    is_ = " is" if rng.random() < 0.4 else ""
    return f"{_np(m, rng)}{is_} between {_np(a, rng)} and {_np(b, rng)}"


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct captions of ``scene``, each true of it."""
    if len(scene.objects) == 1:
        plan = ["single"] * n
    else:
        base = ["list", "relation", "relation", "count_relation", "count"]
        if _between(scene) is not None and rng.random() < 0.5:
            base[2] = "between"
        plan = [base[i % len(base)] for i in range(n)]
        plan = [plan[int(i)] for i in rng.permutation(n)]
    makers = {
        "single": _cap_single, "list": _cap_list, "relation": _cap_relation,
        "count_relation": _cap_count_relation, "count": _cap_count, "between": _cap_between,
    }
    fallback = ["single"] if len(scene.objects) == 1 else ["list", "relation", "count"]
    captions: list[str] = []
    for kind in plan:
        for attempt in range(40):
            k = kind if attempt < 10 else _choice(rng, fallback)
            c = makers[k](scene, rng)
            if c not in captions:
                captions.append(c)
                break
        else:
            raise RuntimeError(f"could not write {n} distinct captions for {scene}")
    return captions


# --------------------------------------------------------------------------------------------
# Dataset on disk


def _params(num_train, num_val, num_test, image_size, seed, max_objects, captions_per_image):
    return {
        "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
        "image_size": int(image_size), "seed": int(seed), "max_objects": int(max_objects),
        "captions_per_image": int(captions_per_image),
    }


def _manifest(params: dict) -> dict:
    return {"generator": "captioner.data.synthetic", "version": GENERATOR_VERSION,
            "params": params}


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_current(root: Path, params: dict) -> bool:
    return _read_manifest(root) == _manifest(params)


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: independent of the other images."""
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def make_example(seed: int, split: str, index: int, image_size: int = 64, max_objects: int = 3,
                 captions_per_image: int = 5) -> tuple[Scene, Image.Image, list[str]]:
    """Scene, image and captions of image ``index`` (0-based) of ``split``, as written."""
    rng = split_rng(seed, split, index)
    scene = make_scene(rng, image_size, max_objects)
    noise_seed = int(rng.integers(2**63 - 1))
    captions = describe(scene, rng, captions_per_image)
    return scene, render(scene, noise_seed), captions


def _write_example(job: tuple) -> list[str]:
    """Render image ``index`` of ``split`` to its PNG; returns its captions (a worker's task)."""
    out, split, index, params = job
    _, img, captions = make_example(params["seed"], split, index, params["image_size"],
                                    params["max_objects"], params["captions_per_image"])
    img.save(out / "images" / f"{split}/{index + 1:06d}.png", format="PNG", compress_level=1)
    return captions


def _write_split(out: Path, split: str, count: int, params: dict) -> None:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    size = params["image_size"]
    cpi = params["captions_per_image"]
    jobs = [(out, split, i, params) for i in range(count)]
    # Every image has its own random stream (split_rng), so worker processes write exactly the
    # images one process would: rendering is CPU-bound PIL work, one core per process.
    workers = min(usable_cores(), 8) if count >= _PARALLEL_MIN_IMAGES else 1
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            all_captions = list(pool.map(_write_example, jobs, chunksize=64))
    else:
        all_captions = [_write_example(job) for job in jobs]
    images, annotations = [], []
    for i, captions in enumerate(all_captions):
        image_id = _ID_OFFSETS[split] + i + 1
        file_name = f"{split}/{i + 1:06d}.png"
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for k, c in enumerate(captions):
            annotations.append({"id": image_id * cpi + k, "image_id": image_id, "caption": c})
    doc = {
        # only what this split's content depends on: other splits' sizes do not change it
        "info": {"description": f"captioner synthetic shapes, {split} split",
                 "version": GENERATOR_VERSION, "seed": params["seed"], "image_size": size,
                 "max_objects": params["max_objects"], "captions_per_image": cpi},
        "images": images,
        "annotations": annotations,
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"captions_{split}.json").write_text(json.dumps(doc))


def generate(root, num_train: int = 4000, num_val: int = 250, num_test: int = 250,
             image_size: int = 64, seed: int = 0, max_objects: int = 3,
             captions_per_image: int = 5) -> Path:
    """Write the synthetic set under ``root`` (if not already there with the same parameters)
    and return ``root`` as a Path.

    Layout: ``images/{train,val,test}/NNNNNN.png``, ``annotations/captions_{split}.json``
    (COCO captions; ``file_name`` relative to ``images``) and ``manifest.json``. The set is
    built in a temporary sibling directory and renamed into place, so ``root`` is either the
    complete old set, or the complete new one. A non-empty ``root`` without a manifest is never
    overwritten (FileExistsError)."""
    root = Path(root)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, c in counts.items():
        if not 0 <= int(c) <= _MAX_PER_SPLIT:
            raise ValueError(f"num_{split} must be in [0, {_MAX_PER_SPLIT}], got {c}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if not 1 <= max_objects <= len(NUMBER_WORDS) - 1:
        raise ValueError(f"max_objects must be in [1, {len(NUMBER_WORDS) - 1}], got {max_objects}")
    params = _params(num_train, num_val, num_test, image_size, seed, max_objects,
                     captions_per_image)
    if _is_current(root, params):
        return root
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        if any(root.iterdir()) and _read_manifest(root) is None:
            raise FileExistsError(
                f"{root} is not empty and has no manifest.json: not a synthetic set, "
                "refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split in SPLITS:
            _write_split(tmp, split, int(counts[split]), params)
        (tmp / "manifest.json").write_text(json.dumps(_manifest(params), indent=2) + "\n")
        if root.exists() and any(root.iterdir()):
            if _is_current(root, params):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, root)  # replaces an empty directory atomically
            except OSError:
                if not _is_current(root, params):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m captioner.data.synthetic",
        description="Generate the synthetic shapes captioning set (COCO caption format).")
    p.add_argument("--root", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=4000)
    p.add_argument("--num-val", type=int, default=250)
    p.add_argument("--num-test", type=int, default=250)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--captions-per-image", type=int, default=5)
    a = p.parse_args(argv)
    root = generate(a.root, a.num_train, a.num_val, a.num_test, a.image_size, a.seed,
                    a.max_objects, a.captions_per_image)
    print(root)


if __name__ == "__main__":
    main()
