"""A user's folder of images + captions file -> deterministic COCO-style splits; Flickr8k's
official split; the real data configs compose."""

import json
import shutil

import pytest
from hydra.utils import instantiate

from captioner.data.captions import CaptionDataError
from captioner.data.folder import prepare_folder, read_caption_table, split_by_hash
from tests.conftest import SHARED, compose_config

NAMES = [f"img{i:02d}.png" for i in range(20)]


def test_split_by_hash_is_exact_deterministic_and_order_free():
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = split_by_hash(NAMES, fractions, seed=0)
    assert a == split_by_hash(list(reversed(NAMES)), fractions, seed=0)
    assert [sum(v == s for v in a.values()) for s in fractions] == [16, 2, 2]
    assert a != split_by_hash(NAMES, fractions, seed=1)
    small = split_by_hash(NAMES[:3], fractions)  # tiny sets still get one image per split
    assert sorted(small.values()) == ["test", "train", "val"]
    with pytest.raises(CaptionDataError):
        split_by_hash(NAMES, {"train": -1.0, "val": 0.5})


def make_folder(root, synthetic_root, fmt="jsonl"):
    sources = sorted((synthetic_root / "images" / "train").glob("*.png"))
    (root / "pics").mkdir(parents=True)
    rows = []
    for i, name in enumerate(NAMES):
        shutil.copy(sources[i], root / "pics" / name)
        rows += [{"file_name": f"pics/{name}", "caption": f"photo {i} take {j}"} for j in range(2)]
    if fmt == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (root / "captions.csv").write_text(
            "file_name,caption\n" + "".join(f'{r["file_name"]},"{r["caption"]}"\n' for r in rows))
    return rows


def test_jsonl_and_csv_read_the_same(tmp_path, synthetic_root):
    make_folder(tmp_path / "a", synthetic_root, "jsonl")
    make_folder(tmp_path / "b", synthetic_root, "csv")
    a = read_caption_table(tmp_path / "a" / "captions.jsonl")
    assert a == read_caption_table(tmp_path / "b" / "captions.csv")
    assert a["pics/img03.png"] == ["photo 3 take 0", "photo 3 take 1"]
    (tmp_path / "bad.csv").write_text("name,text\nx.png,hello\n")
    with pytest.raises(CaptionDataError, match="lacks column"):
        read_caption_table(tmp_path / "bad.csv")
    (tmp_path / "escape.jsonl").write_text('{"file_name": "../x.png", "caption": "c"}\n')
    with pytest.raises(CaptionDataError, match="escapes"):
        prepare_folder(tmp_path / "a", tmp_path / "escape.jsonl", tmp_path / "out", {"train": 1.0})


def test_folder_config_trains_from_a_users_folder(tmp_path, synthetic_root):
    root = tmp_path / "mine"
    make_folder(root, synthetic_root)
    cfg = compose_config("train", ["data=folder", f"data.root={root}", "data.image_size=32",
                                   "data.batch_size=4", "data.num_workers=0"], tmp_path)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    ids = {s: {r.image_id for r in dm._records(s)} for s in ("train", "val", "test")}
    assert [len(v) for v in ids.values()] == [16, 2, 2]
    assert set.union(*ids.values()) == set(range(1, 21)) and not ids["val"] & ids["test"]
    doc = json.loads((root / "splits" / "captions_train.json").read_text())
    assert len(doc["annotations"]) == 32 and doc["images"][0]["file_name"].startswith("pics/")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["captions"].shape[:2] == (4, 5)


@pytest.mark.skipif(not (SHARED / "data" / "flickr8k").is_dir(), reason="needs ../shared")
def test_flickr8k_config_reads_the_official_split(tmp_path):
    cfg = compose_config("train", ["data=flickr8k", f"data.root={SHARED / 'data' / 'flickr8k'}"],
                         tmp_path)
    dm = instantiate(cfg.data)
    ids = {s: {r.image_id for r in dm._records(s)} for s in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert all(len(r.captions) == 5 for r in dm._records("test"))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "rsicd").is_dir(), reason="needs ../shared")
def test_rsicd_config_reads_the_official_split(tmp_path):
    cfg = compose_config("train", ["data=rsicd", f"data.root={SHARED / 'data' / 'rsicd'}"], tmp_path)
    dm = instantiate(cfg.data)
    assert [len(dm._records(s)) for s in ("train", "val", "test")] == [8734, 1094, 1093]
