import json

import pytest

from captioner.data.captions import CaptionDataError, read_coco, read_karpathy, read_split
from captioner.data.datamodule import CaptionDataModule
from captioner.data.images import ImageLoadError
from captioner.data.tokenizer import (
    decode,
    encode,
    tokenizer_from_json,
    tokenizer_to_json,
    train_tokenizer,
)


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def coco_doc(names, captions_per=2):
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(names)]
    anns = [{"id": 10 * (i + 1) + j, "image_id": i + 1, "caption": f"A photo number {i} take {j}."}
            for i in range(len(names)) for j in range(captions_per)]
    return {"images": images, "annotations": anns}


def test_read_coco_groups_captions(tmp_path):
    ann = write(tmp_path / "a.json", coco_doc(["x.jpg", "y.jpg"]))
    recs = read_coco(ann, tmp_path)
    assert [r.image_id for r in recs] == [1, 2]
    assert recs[0].captions == ["A photo number 0 take 0.", "A photo number 0 take 1."]
    assert recs[1].path == str((tmp_path / "y.jpg").resolve())


def test_read_karpathy_split_with_restval(tmp_path):
    doc = {"images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "restval", "cocoid": 5,
         "sentences": [{"raw": "A cat."}, {"tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "x y"}]},
    ]}
    ann = write(tmp_path / "dataset_coco.json", doc)
    train = read_karpathy(ann, tmp_path, "train")
    assert len(train) == 1 and train[0].image_id == 5 and train[0].captions == ["A cat.", "a dog"]
    assert train[0].path.endswith("val2014/a.jpg")
    assert [r.image_id for r in read_karpathy(ann, tmp_path, "test")] == [7]


@pytest.mark.parametrize("doc, message", [
    ("{not json", "malformed JSON"),
    ({"images": []}, "not COCO caption JSON"),
    ({"images": [{"id": 1}], "annotations": []}, "lacks key 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []},
     "duplicate image id 1"),
    ({"images": [{"id": 1, "file_name": "../../etc/passwd"}], "annotations": []}, "escapes"),
    ({"images": [{"id": 1, "file_name": "/etc/passwd"}], "annotations": []}, "escapes"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     "unknown image id 2"),
])
def test_bad_annotations_name_the_file(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(CaptionDataError, match=message) as e:
        read_coco(path, tmp_path / "images")
    assert "bad.json" in str(e.value)


def test_empty_captions_dropped_and_empty_split_refused(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "caption": "   "}, {"image_id": 1, "caption": ""}]}
    path = write(tmp_path / "a.json", doc)
    with pytest.raises(CaptionDataError, match="no image with a caption"):
        read_split(str(path), str(tmp_path))


def test_missing_image_named_in_json_fails_naming_the_file(tmp_path, synthetic_root):
    doc = json.loads((synthetic_root / "annotations/captions_train.json").read_text())
    doc["images"][3]["file_name"] = "train/missing_picture.png"
    ann = write(tmp_path / "captions_train.json", doc)
    dm = CaptionDataModule(splits={"train": {"annotations": str(ann), "images": str(synthetic_root / "images")}},
                           num_workers=0)
    with pytest.raises(ImageLoadError, match="missing_picture.png"):
        dm.setup()
    dm = CaptionDataModule(splits={"train": {"annotations": str(ann), "images": str(synthetic_root / "images")}},
                           num_workers=0, skip_bad_images=True)
    dm.setup()
    assert dm.num_missing_images == 1 and len(dm.table("train")) == 23


def test_tokenizer_round_trip_and_special_ids():
    tok = train_tokenizer(["A red circle, left of a BLUE square.", "two shapes"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = encode(tok, ["a red circle above a square"], max_length=30)[0]
    assert ids[0] == 1 and ids[-1] == 2 and 3 in ids  # "above" is unknown
    assert decode(tok, ids[1:]) == "a red circle a square"
    again = tokenizer_from_json(tokenizer_to_json(tok))
    assert encode(again, ["two red shapes"], 30) == encode(tok, ["two red shapes"], 30)
    assert encode(tok, ["a red circle left of a blue square"], 4)[0] == [1] + ids[1:3] + [2]


def test_dataloader_batches_with_workers(synthetic_root):
    dm = CaptionDataModule(
        splits={s: {"annotations": str(synthetic_root / f"annotations/captions_{s}.json"),
                    "images": str(synthetic_root / "images")} for s in ("train", "val")},
        image_size=32, batch_size=4, num_workers=2, captions_per_image=3)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["captions"].shape[:2] == (4, 3) and (batch["captions"][:, :, 0] == 1).all()
    assert len(dm.references("val")) == 8
