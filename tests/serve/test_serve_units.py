"""The serving pieces without a server: request parsing, the batch with bad requests in it, the
model handle, and the CLI's one-line refusals at start."""

from __future__ import annotations

import base64
import io
import json
import socket

import pytest
import torch
from PIL import Image
from serve_helpers import jpeg
from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse

from captioner.cli import serve as serve_cli
from captioner.serve.api import CaptionAPI, Job, Limits, Rejected, parse_request
from captioner.serve.model import DecodeSettings, TorchCaptionModel, load_caption_model
from captioner.utils.errors import InputError

DEFAULTS = {"beam_size": 3, "max_length": 8}


def test_parse_json_and_form_with_defaults_and_limits():
    data = jpeg()
    b64 = base64.b64encode(data).decode()
    got, settings, _ = parse_request({"image": b64}, DEFAULTS, Limits())
    assert got == data and settings == DecodeSettings(3, 8, 1, False)
    got, settings, _ = parse_request({"image": "data:image/jpeg;base64," + b64, "beam_size": 1,
                                      "attention": True}, DEFAULTS, Limits())
    assert got == data and settings == DecodeSettings(1, 8, 1, True)
    form = FormData([("image", UploadFile(io.BytesIO(data), filename="a.jpg")),
                     ("alternatives", "2"), ("max_length", "12")])
    got, settings, name = parse_request(form, DEFAULTS, Limits())
    assert got == data and settings == DecodeSettings(3, 12, 2, False) and "a.jpg" in name
    for bad, words in [({"image": b64, "beam_size": 0}, "beam_size=0"),
                       ({"image": b64, "beam_size": 11}, "from 1 to 10"),
                       ({"image": b64, "max_length": 51}, "max_length=51"),
                       ({"image": b64, "alternatives": 4}, "beam_size (3)"),
                       ({"image": b64, "top_p": 0.9}, "unknown parameter 'top_p'"),
                       ({"image": 3}, "base64 string"), ({"img": b64}, "no 'image' key")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse_request(bad, DEFAULTS, Limits())


class FakeModel:
    """Any runtime behind the handle interface serves: this one captions by the photo's colour."""

    info = {"decode": DEFAULTS, "grid": [1, 1]}

    def __init__(self):
        self.calls = []

    def __call__(self, images, settings):
        self.calls.append((len(images), settings))
        return [{"caption": "red" if im.getpixel((0, 0))[0] > 128 else "dark", "words": ["x"],
                 "score": -1.0, "alternatives": [], "attention": [[1.0]]} for im in images]


def test_a_bad_request_is_answered_alone_and_its_batch_goes_on():
    api = CaptionAPI("unused.ckpt", Limits(max_pixels=10_000), max_batch_size=8)
    api.model, api.defaults = FakeModel(), DEFAULTS
    red, dark = base64.b64encode(jpeg(color="red")).decode(), base64.b64encode(jpeg(color="black")).decode()
    requests = [{"image": red}, {"image": red, "beam_size": 99}, {"image": dark, "beam_size": 1},
                {"image": base64.b64encode(jpeg(200, 200)).decode()}, {"image": dark}]
    jobs = [api.decode_request(r) for r in requests]
    assert [type(j) for j in jobs] == [Job, Rejected, Job, Rejected, Job]
    out = [api.encode_response(o) for o in api.predict(jobs)]
    assert [o["caption"] for o in (out[0], out[4])] == ["red", "dark"] and out[2]["caption"] == "dark"
    assert out[0]["batch_size"] == 2 and out[2]["batch_size"] == 1  # one search per setting
    assert api.model.calls == [(2, DecodeSettings(3, 8)), (1, DecodeSettings(1, 8))]
    for o, status in ((out[1], 400), (out[3], 422)):
        assert isinstance(o, JSONResponse) and o.status_code == status
        assert "\n" not in json.loads(o.body)["detail"]
    # batching off: LitServe hands predict one request, not a list
    assert api.encode_response(api.predict(api.decode_request({"image": red})))["caption"] == "red"


def test_torch_model_handle(serve_checkpoint):
    model = TorchCaptionModel(serve_checkpoint)
    assert model.info["grid"] == [4, 4] and model.info["decode"]["beam_size"] == 3
    images = [Image.new("RGB", (50, 30), c) for c in ("red", "blue")]
    out = model(images, DecodeSettings(beam_size=4, max_length=6, alternatives=2, attention=True))
    assert len(out) == 2
    for r in out:
        assert r["words"] == r["caption"].split() and len(r["words"]) <= 6
        assert len(r["alternatives"]) == 2 and r["alternatives"][0]["caption"] == r["caption"]
        assert len(r["attention"]) == len(r["words"]) and all(len(a) == 16 for a in r["attention"])
    assert "attention" not in model(images[:1], DecodeSettings(1, 6))[0]


def test_an_ensemble_of_checkpoints_is_one_model_handle(serve_checkpoint, tmp_path):
    """``--checkpoint A --checkpoint B``: one handle; a model with itself answers as the model."""
    single = TorchCaptionModel(serve_checkpoint)
    twice = load_caption_model([serve_checkpoint, serve_checkpoint])
    assert twice.info["name"] == "tiny.ckpt + tiny.ckpt"
    assert twice.info["decoder"] == "LSTMDecoder + LSTMDecoder"
    assert twice.info["grid"] == single.info["grid"] and twice.info["decode"] == single.info["decode"]
    assert twice.info["encoder"] == single.info["encoder"]  # one shared encoder, described once
    # members on distinct encoders (other weights): /info describes each
    from captioner.checkpoint import load_checkpoint, save_checkpoint

    model, tok, payload = load_checkpoint(serve_checkpoint)
    with torch.no_grad():
        model.encoder.blocks[0][0].weight.mul_(2)
    other = save_checkpoint(tmp_path / "other.ckpt", model, payload["model_config"], tok,
                            payload["decode"], payload["image_size"])
    joined = load_caption_model([serve_checkpoint, other]).info["encoder"]
    assert joined["class"] == "ConcatEncoder" and joined["members"] == [single.info["encoder"]] * 2
    images = [Image.new("RGB", (50, 30), c) for c in ("red", "blue")]
    settings = DecodeSettings(beam_size=3, max_length=6, alternatives=2)
    for a, b in zip(single(images, settings), twice(images, settings)):
        assert a["caption"] == b["caption"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
    export = tmp_path / "export"
    export.mkdir()
    with pytest.raises(InputError, match="export: an ensemble is served from checkpoints"):
        load_caption_model([serve_checkpoint, export])
    api = CaptionAPI([serve_checkpoint, serve_checkpoint], Limits())  # what the worker loads
    api.setup("cpu")
    assert api.model.info["name"] == "tiny.ckpt + tiny.ckpt"
    args = serve_cli.parse_args(["--checkpoint", "a.ckpt", "--checkpoint", "b.ckpt"])
    assert [str(p) for p in args.checkpoint] == ["a.ckpt", "b.ckpt"]


def test_bad_checkpoint_or_busy_port_stop_the_server_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert serve_cli.main(["--checkpoint", str(bad), "--port", "18731"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.ckpt" in err and "\n" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert serve_cli.main(["--checkpoint", str(bad), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


def test_onnx_option_needs_an_export_and_excludes_a_checkpoint(tmp_path, capsys):
    """--onnx DIR: a directory that is not an export stops the server with one line naming it;
    --onnx with --checkpoint (or with --accelerator cuda) is a usage error."""
    not_export = tmp_path / "not_an_export"
    not_export.mkdir()
    assert serve_cli.main(["--onnx", str(not_export), "--port", "18732"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not_an_export" in err and "\n" not in err
    for extra in (["--checkpoint", "x.ckpt"], ["--accelerator", "cuda"]):
        with pytest.raises(SystemExit) as e:
            serve_cli.parse_args(["--onnx", str(not_export), *extra])
        assert e.value.code == 2
