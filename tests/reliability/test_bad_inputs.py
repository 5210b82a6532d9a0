"""Every bad input gets one clear error naming the file or key (non-zero exit for the CLIs), or a
counted skip with ``data.skip_bad_images=true``; never a partial output. Extends test_data.py
(annotation errors) and test_spine.py (caption.py on a missing file / directory / bad checkpoint).
"""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from captioner.cli import caption as caption_cli
from captioner.data.captions import CaptionDataError, read_coco, read_karpathy, read_split
from captioner.data.datamodule import CaptionDataModule
from captioner.data.images import ImageLoadError, load_image

ROOT = Path(__file__).resolve().parents[2]


# ---- images -------------------------------------------------------------------------------------
def png_bytes(size=(16, 12), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header chunk claiming huge dimensions, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name, data, message", [
    ("corrupt.jpg", jpeg_bytes()[:200] + b"\x00" * 300, "corrupt or truncated"),
    ("truncated.png", png_bytes((64, 64))[:-40], "corrupt or truncated"),
    ("empty.jpg", b"", "not a readable image"),
    ("notes.png", b"these are notes, not pixels\n" * 10, "not a readable image"),
    ("bomb.png", png_claiming(60_000, 60_000), "exceeds the limit of 100000000 .data.max_pixels"),
])
def test_unreadable_images_are_named(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=message) as e:
        load_image(path)
    assert name in str(e.value)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes((40, 30)))
    with pytest.raises(ImageLoadError, match="40x30 pixels exceeds the limit of 1000"):
        load_image(path, max_pixels=1000)


@pytest.mark.parametrize("mode, fmt", [
    ("RGBA", "png"), ("LA", "png"), ("P", "png"), ("L", "png"), ("1", "png"), ("I;16", "png"),
    ("I;16B", "tiff"), ("I", "tiff"), ("F", "tiff"), ("CMYK", "jpeg"), ("CMYK", "tiff"),
    ("YCbCr", "tiff"), ("PA", "tiff"),
])
def test_every_mode_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt}"
    Image.new(mode, (7, 5)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)


def test_sixteen_bit_and_transparency_map_sensibly(tmp_path):
    white16 = Image.new("I;16", (2, 2))
    white16.putpixel((0, 0), 65535)
    white16.save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # onto white


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_bad_image_is_a_counted_skip_with_skip_bad_images(tmp_path, synthetic_root):
    doc = json.loads((synthetic_root / "annotations/captions_train.json").read_text())
    images = tmp_path / "images"
    for img in doc["images"]:
        (images / img["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (images / img["file_name"]).write_bytes((synthetic_root / "images" / img["file_name"]).read_bytes())
    (images / doc["images"][0]["file_name"]).write_bytes(b"")  # zero-byte image
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(doc))

    def loader(skip):
        dm = CaptionDataModule(splits={"train": {"annotations": str(ann), "images": str(images)}},
                               image_size=32, batch_size=len(doc["images"]), num_workers=0,
                               skip_bad_images=skip)
        dm.setup()
        return dm.dataloader("train")

    with pytest.raises(ImageLoadError, match=doc["images"][0]["file_name"]):
        next(iter(loader(False)))
    batch = next(iter(loader(True)))
    assert batch["images"].shape[0] == len(doc["images"]) - 1


# ---- captions -----------------------------------------------------------------------------------
def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("doc, message", [
    ({"images": "nope", "annotations": []}, "not COCO caption JSON"),
    ({"images": [7], "annotations": []}, r"images\[0\] is not an object"),
    ({"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}, "image id must be a 64-bit integer"),
    ({"images": [{"id": 2**70, "file_name": "a.jpg"}], "annotations": []}, "image id must be a 64-bit integer"),
    ({"images": [{"id": 1, "file_name": "a\u0000.jpg"}], "annotations": []}, "invalid file_name"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]},
     r"annotations\[0\] lacks key 'caption'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]},
     "caption is not a string"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "\ud800 x"}]},
     "not valid Unicode"),
])
def test_malformed_coco_records_are_named(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))  # json escapes the lone surrogate as \ud800
    with pytest.raises(CaptionDataError, match=message) as e:
        read_coco(path, tmp_path)
    assert "bad.json" in str(e.value)


@pytest.mark.parametrize("doc, message", [
    ({"images": [{"split": "train", "filename": "a.jpg", "sentences": "x"}]}, "'sentences' is not a list"),
    ({"images": [{"split": ["train"], "filename": "a.jpg", "sentences": []}]}, "split is not a string"),
    ({"images": [{"split": "train", "sentences": []}]}, "lacks key 'filename'"),
    ({"images": [{"split": "train", "filename": "a.jpg", "sentences": [{"tokens": [1]}]}]}, "token is not a string"),
    ({"images": [{"split": "train", "filename": "../../etc/passwd", "sentences": []}]}, "escapes the image root"),
    ({"images": [{"split": "train", "filename": "a.jpg", "imgid": 3, "sentences": []},
                 {"split": "train", "filename": "b.jpg", "imgid": 3, "sentences": []}]}, "duplicate image id 3"),
])
def test_malformed_karpathy_records_are_named(tmp_path, doc, message):
    path = write_json(tmp_path / "dataset.json", doc)
    with pytest.raises(CaptionDataError, match=message) as e:
        read_karpathy(path, tmp_path, "train")
    assert "dataset.json" in str(e.value)


def test_non_utf8_file_directory_and_bom(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"images": [], "annotations": [{"caption": "caf\xe9"}]}'.encode("latin-1"))
    with pytest.raises(CaptionDataError, match="latin1.json: not UTF-8"):
        read_coco(tmp_path / "latin1.json", tmp_path)
    with pytest.raises(CaptionDataError, match="is a directory"):
        read_coco(tmp_path, tmp_path)
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert read_coco(tmp_path / "bom.json", tmp_path)[0].captions == ["x"]


def test_long_whitespace_and_uncaptioned(tmp_path, caplog):
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"image_id": 1, "caption": " word" * 10_000},
                           {"image_id": 1, "caption": "  two\t\nwords  "}]}
    path = write_json(tmp_path / "a.json", doc)
    records = read_split(str(path), str(tmp_path), max_words=100)
    assert [r.image_id for r in records] == [1]  # image 2 has no caption: skipped, and counted
    assert "skipping 1 images without any caption" in caplog.text
    assert len(records[0].captions[0].split()) == 100 and records[0].captions[1] == "two words"


# ---- the CLIs -----------------------------------------------------------------------------------
def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_bad_input_becomes_one_line_and_exit_2(capsys):
    import logging

    from captioner.utils.hydra import exit_on_bad_input

    with pytest.raises(SystemExit) as e, exit_on_bad_input(logging.getLogger("test")):
        raise CaptionDataError("x.json: images[0] lacks key 'id'")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: x.json: images[0] lacks key 'id'\n"
    with pytest.raises(ZeroDivisionError), exit_on_bad_input(logging.getLogger("test")):
        _ = 1 / 0  # a bug keeps its traceback


@pytest.mark.slow  # two interpreters importing torch: ~15 s
def test_train_cli_bad_annotations_and_unknown_argument_exit_2(tmp_path, synthetic_root):
    from conftest import TINY_DATA

    missing = tmp_path / "missing.json"
    proc = run_cli("train.py", f"data.splits.train.annotations={missing}", "data.synthetic=null",
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {missing}: annotation file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train.py", f"data.root={synthetic_root}", *TINY_DATA, "+trainer.not_a_trainer_arg=1",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "not_a_trainer_arg" in proc.stderr


@pytest.mark.slow  # an interpreter importing torch
def test_evaluate_cli_bad_checkpoint_exits_2_writing_nothing(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("nope")
    proc = run_cli("evaluate.py", f"ckpt_path={bad}", cwd=tmp_path)
    assert proc.returncode == 2 and f"{bad}: not a readable checkpoint" in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*.json"))


def test_caption_cli_bad_images_and_missing_checkpoint(tmp_path, capsys, monkeypatch):
    (tmp_path / "zero.jpg").write_bytes(b"")
    bad = tmp_path / "bad.ckpt"
    bad.write_text("nope")
    assert caption_cli.main([str(tmp_path / "zero.jpg"), "--checkpoint", str(bad)]) == 2
    assert "bad.ckpt" in capsys.readouterr().err
    assert caption_cli.main([str(tmp_path / "zero.jpg"), "--checkpoint", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no outputs/train here: no default checkpoint
    assert caption_cli.main([str(tmp_path / "zero.jpg")]) == 2
    assert "no checkpoint found under outputs/train" in capsys.readouterr().err
