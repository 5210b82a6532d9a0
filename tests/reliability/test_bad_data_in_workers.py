"""Bad data met inside data-loader workers and at the edges of the limits: one line naming the
file, or a counted skip; data.max_pixels is the pixel limit that applies."""

import json
import logging
from types import SimpleNamespace

import pytest
from test_bad_inputs import png_claiming

from captioner.data.captions import CaptionDataError
from captioner.data.datamodule import CaptionDataModule
from captioner.data.folder import read_caption_table
from captioner.data.images import ImageLoadError, load_image
from captioner.training.skipped_images import SkippedImagesReport
from captioner.utils.hydra import exit_on_bad_input


@pytest.fixture
def split_with_corrupt_image(tmp_path, synthetic_root):
    doc = json.loads((synthetic_root / "annotations/captions_train.json").read_text())
    doc["images"] = doc["images"][:4]
    ids = {i["id"] for i in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
    images = tmp_path / "images"
    for img in doc["images"]:
        (images / img["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (images / img["file_name"]).write_bytes((synthetic_root / "images" / img["file_name"]).read_bytes())
    bad = images / doc["images"][1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(doc))
    return {"train": {"annotations": str(ann), "images": str(images)}}, bad


def worker_loader(splits, skip: bool):
    dm = CaptionDataModule(splits=splits, image_size=32, batch_size=4, num_workers=1,
                           skip_bad_images=skip)
    dm.setup()
    return dm.dataloader("train")


def test_corrupt_image_in_a_worker_is_one_line_naming_it(split_with_corrupt_image, capsys):
    splits, bad = split_with_corrupt_image
    with pytest.raises(SystemExit) as e, exit_on_bad_input(logging.getLogger("test")):
        next(iter(worker_loader(splits, skip=False)))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_skipped_images_are_counted_per_epoch(split_with_corrupt_image, caplog):
    splits, _ = split_with_corrupt_image
    batch = next(iter(worker_loader(splits, skip=True)))
    assert batch["images"].shape[0] == 3 and batch["num_skipped"] == 1
    report, trainer = SkippedImagesReport(), SimpleNamespace(current_epoch=2, sanity_checking=False)
    report.on_train_epoch_start(trainer, None)
    report.on_train_batch_end(trainer, None, None, batch, 0)
    report.on_train_batch_end(trainer, None, None, batch, 1)
    with caplog.at_level(logging.WARNING):
        report.on_train_epoch_end(trainer, None)
    assert "epoch 2: skipped 2 unreadable train images" in caplog.text


def test_max_pixels_is_the_limit_not_pillows(tmp_path):
    # 95M pixels: over Pillow's own limit (about 89M), under data.max_pixels' default (100M)
    (tmp_path / "big.png").write_bytes(png_claiming(10_000, 9_500))
    with pytest.raises(ImageLoadError) as e:
        load_image(tmp_path / "big.png")
    assert "corrupt or truncated" in str(e.value)  # decoded, not refused: it has no pixel data
    (tmp_path / "huge.png").write_bytes(png_claiming(20_000, 20_000))  # over Pillow's hard limit
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(tmp_path / "huge.png", max_pixels=10**9)
    with pytest.raises(ImageLoadError, match="exceeds the limit of 100000000"):
        load_image(tmp_path / "huge.png")


def test_non_utf8_captions_file_names_file_and_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_bytes(b'{"file_name": "a.jpg", "caption": "a dog"}\n'
                     + '{"file_name": "b.jpg", "caption": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(CaptionDataError) as e:
        read_caption_table(path)
    assert str(e.value).startswith(f"{path}: line 2: not UTF-8") and "\n" not in str(e.value)
