import json
import re

import numpy as np
import pytest
from PIL import Image

from captioner.data import synthetic as S

SMALL = {"num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64, "seed": 3}

COLOR_RE = "|".join(S.COLORS)
SHAPE_RE = "|".join(S.SHAPES)
NP_RE = rf"(?:(small|large|big) )?({COLOR_RE}) ({SHAPE_RE})"
REL_WORDS = {
    "to the left of": "left", "left of": "left", "to the right of": "right",
    "right of": "right", "above": "above", "over": "above", "below": "below", "under": "below",
}
REL_RE = "|".join(sorted(REL_WORDS, key=len, reverse=True))
# every word a caption may use; all of them are grounded in the image (or are function words)
ALLOWED = (
    set(S.COLORS) | set(S.SHAPES) | set(S.PLURALS.values()) | set(S.NUMBER_WORDS[1:])
    | {"small", "large", "big", "a", "an", "the", "of", "to", "left", "right", "above", "below",
       "over", "under", "between", "and", "with", "is", "are", "there", "on", "in", "shapes",
       "shape", "objects", "image", "picture", "background", "white", "plain", "light",
       "single", "alone"}
)


def words(caption):
    return re.sub(r"[^\w\s]", " ", caption).split()


def find(scene, size, color, shape):
    matches = [o for o in scene.objects if o.color == color and o.shape == shape]
    assert len(matches) == 1, (color, shape, scene)
    o = matches[0]
    if size is not None:
        assert o.size == ("small" if size == "small" else "large"), (size, o)
    return o


def check_caption(scene, caption):
    """Every object, count and relation named in ``caption`` is true of ``scene``."""
    assert caption == caption.lower() and caption == caption.strip()
    ws = words(caption)
    assert set(ws) <= ALLOWED, set(ws) - ALLOWED
    for i, w in enumerate(ws[:-1]):  # a / an
        if w == "a":
            assert ws[i + 1][0] not in "aeiou", caption
        if w == "an":
            assert ws[i + 1][0] in "aeiou", caption
    nps = re.findall(NP_RE, caption)
    for size, color, shape in nps:
        find(scene, size or None, color, shape)
    checked = 0
    # relations: NP [is] REL NP
    for m in re.finditer(rf"{NP_RE}(?: is)? ({REL_RE}) (?:a|an) {NP_RE}", caption):
        a = find(scene, m.group(1) or None, m.group(2), m.group(3))
        b = find(scene, m.group(5) or None, m.group(6), m.group(7))
        assert S.relation(a, b) == REL_WORDS[m.group(4)], (caption, a, b)
        checked += 1
    for m in re.finditer(rf"{NP_RE}(?: is)? between (?:a|an) {NP_RE} and (?:a|an) {NP_RE}",
                         caption):
        g = m.groups()
        mid, a, b = (find(scene, g[i] or None, g[i + 1], g[i + 2]) for i in (0, 3, 6))
        assert {S.relation(mid, a), S.relation(mid, b)} in ({"left", "right"}, {"above", "below"})
        checked += 1
    # counts
    for m in re.finditer(r"\b(one|two|three|four|five|six|seven|eight|nine) (shapes?|objects?)",
                         caption):
        assert S.NUMBER_WORDS.index(m.group(1)) == len(scene.objects), caption
    if "single" in ws or "alone" in ws or re.match(r"one ", caption):
        assert len(scene.objects) == 1
    # a caption naming no object at all must at least state the count
    if not nps:
        assert any(w in S.NUMBER_WORDS for w in ws), caption
    if any(w in ws for w in ("left", "right", "above", "below", "over", "under", "between")):
        assert checked, f"relation not parsed: {caption}"
    return checked


def scenes(n, max_objects=3, image_size=64):
    for i in range(n):
        rng = S.split_rng(0, "train", i)
        scene = S.make_scene(rng, image_size, max_objects)
        yield scene, rng


def test_scene_constraints():
    counts = {}
    for scene, _ in scenes(400):
        objs = scene.objects
        counts[len(objs)] = counts.get(len(objs), 0) + 1
        assert 1 <= len(objs) <= 3
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        s = scene.image_size
        for o in objs:
            lo, hi = S.SIZE_RANGES[o.size]
            assert lo * s <= o.r <= hi * s
            assert o.r < o.x < s - o.r and o.r < o.y < s - o.r
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                # boxes do not overlap, the relation is clear and antisymmetric
                assert (abs(a.x - b.x) > a.r + b.r) or (abs(a.y - b.y) > a.r + b.r)
                ra, rb = S.relation(a, b), S.relation(b, a)
                assert ra is not None
                assert {ra, rb} in ({"left", "right"}, {"above", "below"})
    assert counts[2] + counts[3] > 0.8 * 400 and counts.get(1, 0) > 0


@pytest.mark.parametrize("max_objects", [1, 3, 4])
def test_captions_distinct_and_grounded(max_objects):
    relations = 0
    for scene, rng in scenes(250, max_objects):
        caps = S.describe(scene, rng, 5)
        assert len(caps) == 5 and len(set(caps)) == 5
        for c in caps:
            relations += check_caption(scene, c)
    assert (relations > 200) == (max_objects > 1)


def test_relation_directions():
    a = S.SceneObject("circle", "red", "small", 10, 30, 5, (215, 40, 40))
    b = S.SceneObject("square", "blue", "small", 50, 32, 5, (40, 80, 215))
    c = S.SceneObject("cross", "green", "small", 12, 55, 5, (40, 160, 60))
    d = S.SceneObject("cross", "green", "small", 30, 50, 5, (40, 160, 60))
    assert S.relation(a, b) == "left" and S.relation(b, a) == "right"
    assert S.relation(a, c) == "above" and S.relation(c, a) == "below"
    assert S.relation(a, d) is None  # diagonal: no relation is claimed


def nearest_color(px, background):
    palette = dict(S.COLORS, background=background)
    return min(palette, key=lambda k: sum((int(p) - q) ** 2 for p, q in zip(px, palette[k])))


def test_render_pixels_match_scene():
    for i, (scene, rng) in enumerate(scenes(200)):
        arr = np.asarray(S.render(scene, noise_seed=i))
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
        covered = np.zeros((64, 64), bool)
        for o in scene.objects:
            px = arr[int(o.y), int(o.x)]
            assert nearest_color(px, scene.background) == o.color, (o, px)
            assert np.abs(px.astype(int) - np.array(o.rgb)).max() <= 12
            y0, y1 = int(o.y - o.r) - 1, int(o.y + o.r) + 2
            x0, x1 = int(o.x - o.r) - 1, int(o.x + o.r) + 2
            covered[max(y0, 0):y1, max(x0, 0):x1] = True
        # outside the objects' boxes only background shows
        bg = arr[~covered].astype(int)
        assert np.abs(bg - np.array(scene.background)).max() <= 12
        # every colour named in a caption is drawn where its object is
        for cap in S.describe(scene, rng, 5):
            for _, color, shape in re.findall(NP_RE, cap):
                o = find(scene, None, color, shape)
                assert nearest_color(arr[int(o.y), int(o.x)], scene.background) == color


def load(root, split):
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())


def test_generate_schema(tmp_path):
    root = S.generate(tmp_path / "syn", **SMALL)
    assert root == tmp_path / "syn"
    image_ids, ann_ids = set(), set()
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        doc = load(root, split)
        assert set(doc) == {"info", "images", "annotations"}
        assert len(doc["images"]) == n
        for im in doc["images"]:
            assert set(im) == {"id", "file_name", "width", "height"}
            assert im["file_name"].startswith(f"{split}/") and im["file_name"].endswith(".png")
            with Image.open(root / "images" / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) == (64, 64)
                assert img.mode == "RGB"
            assert im["id"] not in image_ids
            image_ids.add(im["id"])
        per_image = {}
        for a in doc["annotations"]:
            assert set(a) == {"id", "image_id", "caption"}
            assert isinstance(a["caption"], str) and a["caption"]
            assert a["id"] not in ann_ids
            ann_ids.add(a["id"])
            per_image.setdefault(a["image_id"], []).append(a["caption"])
        assert set(per_image) == {im["id"] for im in doc["images"]}
        for caps in per_image.values():
            assert len(caps) == 5 and len(set(caps)) == 5
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["num_train"] == 12 and manifest["version"] == S.GENERATOR_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name != "syn"]  # no temp dirs left


def test_written_set_matches_scenes(tmp_path):
    root = S.generate(tmp_path / "syn", **SMALL)
    doc = load(root, "val")
    caps = {}
    for a in doc["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    for i, im in enumerate(doc["images"]):
        scene, img, captions = S.make_example(3, "val", i)
        assert caps[im["id"]] == captions
        for c in captions:
            check_caption(scene, c)
        with Image.open(root / "images" / im["file_name"]) as disk:
            assert np.array_equal(np.asarray(disk), np.asarray(img))


def test_deterministic(tmp_path):
    a = S.generate(tmp_path / "a", **SMALL)
    b = S.generate(tmp_path / "b", **SMALL)
    for split in S.SPLITS:
        name = f"annotations/captions_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes()
        for p in sorted((a / "images" / split).iterdir()):
            with Image.open(p) as x, Image.open(b / "images" / split / p.name) as y:
                assert np.array_equal(np.asarray(x), np.asarray(y))
    c = S.generate(tmp_path / "c", **dict(SMALL, seed=4))
    assert (a / "annotations/captions_train.json").read_bytes() != (
        c / "annotations/captions_train.json").read_bytes()


def test_splits_independent(tmp_path):
    a = S.generate(tmp_path / "a", **SMALL)
    b = S.generate(tmp_path / "b", **dict(SMALL, num_train=5))
    for split in ("val", "test"):
        name = f"annotations/captions_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ta, tb = load(a, "train"), load(b, "train")
    assert ta["images"][:5] == tb["images"]
    assert ta["annotations"][:25] == tb["annotations"]


def test_idempotent(tmp_path):
    root = S.generate(tmp_path / "syn", **SMALL)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert S.generate(root, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # other parameters: regenerated in place
    S.generate(root, **dict(SMALL, num_train=3))
    assert len(load(root, "train")["images"]) == 3
    assert len(list((root / "images" / "train").iterdir())) == 3
    assert json.loads((root / "manifest.json").read_text())["params"]["num_train"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        S.generate(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    S.generate(tmp_path / "empty", **SMALL)
    assert (tmp_path / "empty" / "manifest.json").exists()


def test_cli(tmp_path, capsys):
    S.main(["--root", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1",
            "--num-test", "1", "--captions-per-image", "3", "--seed", "7"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    doc = load(tmp_path / "cli", "train")
    assert len(doc["images"]) == 2 and len(doc["annotations"]) == 6


def test_parallel_generation_writes_the_same_files(tmp_path, monkeypatch):
    """Worker processes render exactly what one process renders (each image has its own
    random stream)."""
    import hashlib

    from captioner.data import synthetic

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 10**9)
    one = synthetic.generate(tmp_path / "one", num_train=24, num_val=4, num_test=4, image_size=32)
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 8)
    monkeypatch.setattr(synthetic, "usable_cores", lambda: 2)
    two = synthetic.generate(tmp_path / "two", num_train=24, num_val=4, num_test=4, image_size=32)
    assert digest(one) == digest(two) and len(digest(one)) == 24 + 4 + 4 + 3 + 1
