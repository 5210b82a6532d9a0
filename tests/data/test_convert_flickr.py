import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_flickr.py"
_spec = importlib.util.spec_from_file_location("convert_flickr", SCRIPT)
cf = importlib.util.module_from_spec(_spec)
sys.modules["convert_flickr"] = cf
_spec.loader.exec_module(cf)

TOKENS = (
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs .\n"
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
    "1001773457_577c3a7d70.jpg#1\tA black dog and a white dog fighting .\n"
    "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    "\n"
    "1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint sits in front of a rainbow .\r\n"
    "1003163366_44323f5815.jpg#0\tA man lays on a bench   while his dog sits by him .\n"
)


@pytest.fixture
def files(tmp_path):
    tok = tmp_path / "Flickr8k.token.txt"
    tok.write_text(TOKENS)
    train = tmp_path / "Flickr_8k.trainImages.txt"
    train.write_text("1000268201_693b08cb0e.jpg\n1001773457_577c3a7d70.jpg\n\n")
    val = tmp_path / "Flickr_8k.devImages.txt"
    val.write_text("1002674143_1b742ab4b8.jpg\n")
    test = tmp_path / "Flickr_8k.testImages.txt"
    test.write_text("1003163366_44323f5815.jpg\n9999999999_nocaption.jpg\n")
    return tok, {"train": train, "val": val, "test": test}


def load(path):
    return json.loads(Path(path).read_text())


def test_read_tokens(files):
    tok, _ = files
    caps = cf.read_tokens(tok)
    assert list(caps["1001773457_577c3a7d70.jpg"]) == [
        "A black dog and a spotted dog are fighting", "A black dog and a white dog fighting ."]
    assert caps["1003163366_44323f5815.jpg"] == ["A man lays on a bench while his dog sits by him ."]
    assert len(caps) == 4


def test_official_splits(files, tmp_path, capsys):
    tok, splits = files
    out = tmp_path / "out"
    written = cf.convert(out, tokens=tok, splits=splits, image_prefix="Flicker8k_Dataset/")
    assert set(written) == {"train", "val", "test"}
    err = capsys.readouterr().err
    assert "1 image(s) of split 'test'" in err and "9999999999_nocaption.jpg" in err
    docs = {s: load(out / f"captions_{s}.json") for s in ("train", "val", "test")}
    assert [im["file_name"] for im in docs["train"]["images"]] == [
        "Flicker8k_Dataset/1000268201_693b08cb0e.jpg", "Flicker8k_Dataset/1001773457_577c3a7d70.jpg"]
    assert len(docs["train"]["annotations"]) == 4
    assert len(docs["test"]["images"]) == 1  # the caption-less image is skipped
    img_ids = [im["id"] for d in docs.values() for im in d["images"]]
    ann_ids = [a["id"] for d in docs.values() for a in d["annotations"]]
    assert len(set(img_ids)) == len(img_ids) == 4 and all(isinstance(i, int) for i in img_ids)
    assert len(set(ann_ids)) == len(ann_ids) == 6
    for d in docs.values():
        assert set(d) == {"info", "images", "annotations"}
        ids = {im["id"] for im in d["images"]}
        assert {a["image_id"] for a in d["annotations"]} == ids
    # captions keep the #N order
    first = docs["train"]["images"][1]["id"]
    assert next(a["caption"] for a in docs["train"]["annotations"] if a["image_id"] == first) \
        == "A black dog and a spotted dog are fighting"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_ids_do_not_depend_on_split_choice(files, tmp_path):
    tok, splits = files
    cf.convert(tmp_path / "a", tokens=tok, splits=splits)
    cf.convert(tmp_path / "b", tokens=tok)
    all_doc = load(tmp_path / "b" / "captions_all.json")
    assert len(all_doc["images"]) == 4 and len(all_doc["annotations"]) == 6
    by_name = {im["file_name"]: im["id"] for im in all_doc["images"]}
    ann = {(a["image_id"], a["caption"]): a["id"] for a in all_doc["annotations"]}
    for s in ("train", "val", "test"):
        d = load(tmp_path / "a" / f"captions_{s}.json")
        for im in d["images"]:
            assert by_name[im["file_name"]] == im["id"]
        for a in d["annotations"]:
            assert ann[(a["image_id"], a["caption"])] == a["id"]
    # deterministic output
    cf.convert(tmp_path / "c", tokens=tok)
    assert (tmp_path / "b" / "captions_all.json").read_bytes() == (
        tmp_path / "c" / "captions_all.json").read_bytes()


def test_karpathy(files, tmp_path):
    tok, _ = files
    kj = tmp_path / "dataset_flickr8k.json"
    kj.write_text(json.dumps({"dataset": "flickr8k", "images": [
        {"filename": "1000268201_693b08cb0e.jpg", "split": "train",
         "sentences": [{"raw": "k one"}, {"raw": "k two"}]},
        {"filename": "1001773457_577c3a7d70.jpg", "split": "restval",
         "sentences": [{"raw": "k three"}]},
        {"filename": "1002674143_1b742ab4b8.jpg", "split": "test", "sentences": [{"raw": "k4"}]},
        {"filename": "1003163366_44323f5815.jpg", "split": "val", "sentences": []},
    ]}))
    # splits from Karpathy, captions from the token file
    cf.convert(tmp_path / "k1", tokens=tok, karpathy=kj)
    train = load(tmp_path / "k1" / "captions_train.json")
    assert len(train["images"]) == 2 and len(train["annotations"]) == 4
    assert train["annotations"][0]["caption"].startswith("A child")
    # captions from Karpathy too: the caption-less image is skipped
    cf.convert(tmp_path / "k2", karpathy=kj, restval="skip")
    train = load(tmp_path / "k2" / "captions_train.json")
    assert [a["caption"] for a in train["annotations"]] == ["k one", "k two"]
    assert load(tmp_path / "k2" / "captions_val.json")["images"] == []


@pytest.mark.parametrize("line, fragment", [
    ("1000268201_693b08cb0e.jpg#0 no tab here", "no tab"),
    ("1000268201_693b08cb0e.jpg\tno caption number", "IMAGE#N"),
    ("1000268201_693b08cb0e.jpg#x\tbad number", "IMAGE#N"),
    ("1000268201_693b08cb0e.jpg#0\t   ", "empty caption"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, fragment):
    tok = tmp_path / "bad.token"
    tok.write_text("1001773457_577c3a7d70.jpg#0\tfine .\n\n" + line + "\n")
    with pytest.raises(cf.ConversionError) as e:
        cf.read_tokens(tok)
    assert f"{tok}:3:" in str(e.value) and fragment in str(e.value)


def test_duplicate_caption_and_split_overlap(tmp_path, files):
    tok, splits = files
    dup = tmp_path / "dup.token"
    dup.write_text("a.jpg#0\tx\na.jpg#0\ty\n")
    with pytest.raises(cf.ConversionError, match=r"dup.token:2: duplicate"):
        cf.read_tokens(dup)
    overlap = tmp_path / "overlap.txt"
    overlap.write_text("1000268201_693b08cb0e.jpg\n")
    with pytest.raises(cf.ConversionError, match="also in split 'train'"):
        cf.convert(tmp_path / "o", tokens=tok, splits={"train": splits["train"], "x": overlap})


def test_image_sizes_and_missing_images(files, tmp_path, capsys):
    from PIL import Image

    tok, splits = files
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (30, 20)).save(img_dir / "1000268201_693b08cb0e.jpg")
    cf.convert(tmp_path / "out", tokens=tok, splits={"train": splits["train"]}, images_dir=img_dir)
    doc = load(tmp_path / "out" / "captions_train.json")
    assert doc["images"] == [{"id": 1, "file_name": "1000268201_693b08cb0e.jpg",
                              "width": 30, "height": 20}]
    assert "missing or unreadable" in capsys.readouterr().err


def test_cli(files, tmp_path):
    tok, splits = files
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "--split" in r.stdout and "--karpathy" in r.stdout
    args = ["--tokens", str(tok), "--out", str(tmp_path / "cli")]
    for s, p in splits.items():
        args += ["--split", f"{s}={p}"]
    assert cf.main(args) == 0
    assert (tmp_path / "cli" / "captions_val.json").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("oops\n")
    r = subprocess.run([sys.executable, str(SCRIPT), "--tokens", str(bad), "--out",
                        str(tmp_path / "x")], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and f"{bad}:1:" in r.stderr
    with pytest.raises(SystemExit):
        cf.main(["--out", str(tmp_path / "y")])  # neither --tokens nor --karpathy
    with pytest.raises(SystemExit):
        cf.main(["--tokens", str(tok), "--out", str(tmp_path / "y"), "--split", "nopath"])
