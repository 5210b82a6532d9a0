"""Property: the caption readers accept a document or raise ``CaptionDataError``, nothing else,
for generated COCO and Karpathy documents, valid and broken in every way JSON allows."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner.data.captions import CaptionDataError, read_coco, read_karpathy

# Any JSON value, for fields that should have been something else.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
IDS = st.integers(-3, 5) | st.integers(-3, 5) | st.integers(2**62, 2**65) | JSON
NAMES = st.sampled_from(["a.jpg", "dir/b.png", "../up.jpg", "/etc/passwd", "", " ", "a\x00.jpg",
                         "x" * 300, "\ud800.jpg"]) | st.text(max_size=12) | JSON
CAPTIONS = st.sampled_from(["A cat.", "", "   ", "\ud800 broken", "word " * 300]) | st.text(max_size=20) | JSON


def maybe_drop(d: dict):
    """The record (half the time), or the record with one key missing."""
    return st.just(d) | st.sampled_from(list(d)).map(lambda k: {x: v for x, v in d.items() if x != k})


coco_images = st.fixed_dictionaries({"id": IDS, "file_name": NAMES}).flatmap(maybe_drop) | JSON
coco_annotations = st.fixed_dictionaries({"image_id": IDS, "caption": CAPTIONS}).flatmap(maybe_drop) | JSON
coco_docs = st.fixed_dictionaries({
    "images": st.lists(coco_images, max_size=4),
    "annotations": st.lists(coco_annotations, max_size=6),
}).flatmap(maybe_drop) | JSON

sentences = st.fixed_dictionaries({"raw": CAPTIONS}) | st.fixed_dictionaries(
    {"tokens": st.lists(st.text(max_size=5) | JSON, max_size=4) | JSON}) | CAPTIONS
karpathy_images = st.fixed_dictionaries(
    {"split": st.sampled_from(["train", "restval", "val", "test"]) | JSON, "filename": NAMES,
     "sentences": st.lists(sentences, max_size=3) | JSON},
    optional={"filepath": st.sampled_from(["val2014", "", ".."]) | JSON, "cocoid": IDS, "imgid": IDS},
).flatmap(maybe_drop) | JSON
karpathy_docs = st.fixed_dictionaries({"images": st.lists(karpathy_images, max_size=4)}) | JSON


def check(read, text: str):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "captions.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            records = read(path, Path(d) / "images")
        except CaptionDataError as e:
            assert "captions.json" in str(e)
            return
        for r in records:  # what is accepted is usable downstream
            assert isinstance(r.image_id, int) and not isinstance(r.image_id, bool)
            assert Path(r.path).is_relative_to((Path(d) / "images").resolve())
            assert all(isinstance(c, str) and c.strip() == c and c for c in r.captions)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(coco_docs)
def test_coco_reader_accepts_or_raises_caption_data_error(doc):
    check(lambda p, images: read_coco(p, images), json.dumps(doc))


@SETTINGS
@given(karpathy_docs, st.sampled_from(["train", "val", "test"]))
def test_karpathy_reader_accepts_or_raises_caption_data_error(doc, split):
    check(lambda p, images: read_karpathy(p, images, split), json.dumps(doc))


@SETTINGS
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_accepted_or_caption_data_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "captions.json"
        path.write_bytes(data)
        try:
            read_coco(path, d)
        except CaptionDataError:
            pass
