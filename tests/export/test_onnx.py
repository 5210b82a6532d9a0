"""ONNX export on tiny random models: ONNX Runtime captions equal PyTorch's through the same
search (greedy, beam 3, sampling; LSTM and Transformer), the CLIs use an export, and bad exports
fail in one line naming the file, the part or the opset."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.checkpoint import build_model, load_checkpoint, save_checkpoint
from captioner.cli import caption as caption_cli
from captioner.cli import export as export_cli
from captioner.data.tokenizer import train_tokenizer, with_vocabulary
from captioner.export.onnx_export import CONFIG, FILES
from captioner.export.onnx_runtime import load
from captioner.models.search import beam_search, greedy_search, sample

CAPTIONS = ["a red square left of a blue circle", "a big green triangle above a small square",
            "two yellow circles right of a purple star"]
ENCODER = {"_target_": "captioner.models.encoder.CNNEncoder", "name": "resnet18",
           "return_layer": "layer1"}
DECODERS = {
    "lstm": {"_target_": "captioner.models.lstm_decoder.LSTMDecoder", "_partial_": True,
             "embed_dim": 16, "hidden_size": 32, "attention_dim": 16},
    "transformer": {"_target_": "captioner.models.transformer_decoder.TransformerDecoder",
                    "_partial_": True, "d_model": 32, "num_layers": 2, "num_heads": 4,
                    "ff_dim": 64, "max_length": 24},
}
# how much the EOS row of the output layer is scaled: the least that makes captions of many
# lengths and contents (measured on these seeds; more makes every caption end at once)
EOS_SCALE = {"lstm": 2.5, "transformer": 1.5}
IMAGE_SIZE, MAX_LENGTH, NUM_IMAGES = 32, 12, 50


def write_checkpoint(path: Path, decoder: dict, eos_scale: float = 2.5, seed: int = 0,
                     preprocess: dict | None = None) -> Path:
    """A complete checkpoint of an untrained model whose weights are spread wide enough that its
    captions vary between images and end at different lengths (the default initialisation of a
    tiny model repeats one word and never ends)."""
    tok = train_tokenizer(CAPTIONS)
    config = with_vocabulary({"_target_": "captioner.models.captioner.Captioner",
                              "encoder": ENCODER, "decoder": decoder}, tok)
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if p.dim() > 1 or name.endswith("bias"):
                p.normal_(0, 0.4)
        out = getattr(model.decoder, "fc", None) or model.decoder.head  # (V, H) output layer
        out.weight[tok.eos_token_id] *= eos_scale  # EOS wins at times
    decode = {"method": "beam", "beam_size": 3, "max_length": MAX_LENGTH}
    return save_checkpoint(path, model, config, tok, decode, IMAGE_SIZE, preprocess)


@pytest.fixture(scope="module", params=list(DECODERS))
def exported(request, tmp_path_factory):
    """(checkpoint, export directory) of each decoder, exported through the CLI."""
    root = tmp_path_factory.mktemp(f"onnx_{request.param}")
    ckpt = write_checkpoint(root / "model.ckpt", DECODERS[request.param], EOS_SCALE[request.param])
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(root / "export")]) == 0
    return ckpt, root / "export"


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(NUM_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE)  # (B, 3, S, S)


def test_greedy_and_beam_equal_pytorch_on_50_images(exported, images):
    ckpt, directory = exported
    model, _, _ = load_checkpoint(ckpt)
    onnx = load(directory)
    with torch.no_grad():
        feats_pt, feats_ort = model.encode(images), onnx.encode(images)  # (B, R, C)
    torch.testing.assert_close(feats_ort, feats_pt, atol=1e-4, rtol=1e-4)
    ids = {"bos_id": model.bos_id, "eos_id": model.eos_id, "pad_id": model.pad_id}

    greedy_pt, attn_pt = greedy_search(model.decoder, feats_pt, max_length=MAX_LENGTH, **ids)
    greedy_ort, attn_ort = greedy_search(onnx.decoder, feats_ort, max_length=MAX_LENGTH, **ids)
    assert torch.equal(greedy_ort, greedy_pt)
    torch.testing.assert_close(attn_ort, attn_pt, atol=1e-4, rtol=1e-4)
    assert len({tuple(r) for r in greedy_pt.tolist()}) > 5  # the model really varies

    beam_pt, _, score_pt = beam_search(model.decoder, feats_pt, beam_size=3, max_length=MAX_LENGTH, **ids)
    beam_ort, _, score_ort = beam_search(onnx.decoder, feats_ort, beam_size=3, max_length=MAX_LENGTH, **ids)
    assert torch.equal(beam_ort, beam_pt)
    assert (score_ort - score_pt).abs().max() < 1e-4
    assert (beam_pt == model.eos_id).any(1).sum() > 5  # captions end at different lengths


def test_sampling_runs_unchanged_on_the_onnx_decoder(exported, images):
    ckpt, directory = exported
    model, _, _ = load_checkpoint(ckpt)
    onnx = load(directory)
    ids = {"bos_id": model.bos_id, "eos_id": model.eos_id, "pad_id": model.pad_id}
    with torch.no_grad():
        feats = model.encode(images[:8])
        torch.manual_seed(3)
        tok_pt, logp_pt, mask_pt = sample(model.decoder, feats, num_samples=4, max_length=MAX_LENGTH, **ids)
        torch.manual_seed(3)
        tok_ort, logp_ort, mask_ort = sample(onnx.decoder, feats, num_samples=4, max_length=MAX_LENGTH, **ids)
    assert torch.equal(tok_ort, tok_pt) and torch.equal(mask_ort, mask_pt)
    torch.testing.assert_close(logp_ort, logp_pt, atol=1e-4, rtol=1e-4)


def test_caption_cli_with_onnx_prints_the_checkpoints_captions(exported, tmp_path, capsys):
    ckpt, directory = exported
    paths = []
    for i, colour in enumerate(["red", "navy", "olive"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    # fp32 on both sides: "auto" would pick bf16 for PyTorch on a CPU with native bf16
    args = [*map(str, paths), "--max-length", str(MAX_LENGTH), "--precision", "fp32"]
    capsys.readouterr()
    assert caption_cli.main([*args, "--checkpoint", str(ckpt)]) == 0
    want = capsys.readouterr().out
    assert caption_cli.main([*args, "--onnx", str(directory)]) == 0
    assert capsys.readouterr().out == want and len(want.splitlines()) == 3
    # the loader a server uses: the same captions, with the export's decoding defaults
    captions = [r["caption"] for r in load(directory).caption_files(paths, max_length=MAX_LENGTH)]
    assert captions == [line.split("\t")[1] for line in want.splitlines()]


def test_export_feeds_the_checkpoints_own_preprocessing(tmp_path, capsys):
    """Not ImageNet statistics: the stored preprocessing (here CLIP-like statistics, the shorter
    side resized and a centre crop) travels into config.json and captioning with the export
    feeds what the checkpoint's model is fed."""
    from captioner.models.encoders.base import make_preprocess

    preprocess = make_preprocess(IMAGE_SIZE, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28],
                                 interpolation="bicubic", resize="shorter", resize_size=36)
    ckpt = write_checkpoint(tmp_path / "model.ckpt", DECODERS["lstm"], EOS_SCALE["lstm"],
                            preprocess=preprocess)
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    stored = json.loads((tmp_path / "export" / CONFIG).read_text())["preprocess"]
    assert {k: stored[k] for k in ("size", "resize", "resize_size", "mean", "std", "interpolation")} == {
        k: preprocess[k] for k in ("size", "resize", "resize_size", "mean", "std", "interpolation")}
    paths = []
    for i in range(6):  # wide and tall photos of noise: the crop and statistics matter
        torch.manual_seed(i)
        pixels = (torch.rand(30 + 20 * (i % 2), 50 - 20 * (i % 2), 3) * 255).byte().numpy()
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    args = [*map(str, paths), "--max-length", str(MAX_LENGTH), "--precision", "fp32"]
    capsys.readouterr()
    assert caption_cli.main([*args, "--checkpoint", str(ckpt)]) == 0
    want = capsys.readouterr().out
    assert caption_cli.main([*args, "--onnx", str(tmp_path / "export")]) == 0
    assert capsys.readouterr().out == want


def test_server_handle_of_an_export_answers_as_the_checkpoints(exported):
    """``captioner-serve --onnx DIR``: the server's model handle for an export gives the
    PyTorch handle's captions, alternatives, scores and attention."""
    from captioner.serve.model import DecodeSettings, OnnxCaptionModel, load_caption_model

    ckpt, directory = exported
    torch_model, onnx_model = load_caption_model(ckpt), load_caption_model(directory)
    assert isinstance(onnx_model, OnnxCaptionModel)
    assert onnx_model.info["runtime"] == "onnxruntime"
    assert onnx_model.info["grid"] == torch_model.info["grid"]
    assert onnx_model.info["decode"]["beam_size"] == torch_model.info["decode"]["beam_size"]
    photos = [Image.new("RGB", (40, 30), c) for c in ("red", "navy", "olive", "white")]
    settings = DecodeSettings(beam_size=3, max_length=MAX_LENGTH, alternatives=2, attention=True)
    torch_model.decode["precision"] = "fp32"  # "auto" is bf16 where the CPU has it natively
    want, got = torch_model(photos, settings), onnx_model(photos, settings)
    assert [g["caption"] for g in got] == [w["caption"] for w in want]
    for g, w in zip(got, want):
        assert [a["caption"] for a in g["alternatives"]] == [a["caption"] for a in w["alternatives"]]
        assert g["score"] == pytest.approx(w["score"], abs=1e-4)
        torch.testing.assert_close(torch.tensor(g["attention"]), torch.tensor(w["attention"]),
                                   atol=1e-4, rtol=0)


def test_export_writes_dynamic_axes_and_states_its_opset(exported):
    import onnx

    _, directory = exported
    config = json.loads((directory / CONFIG).read_text())
    ids = config["special_ids"]
    assert {k: ids[k] for k in ("pad", "bos", "eos", "unk")} == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
    assert ids["bad_endings"] and 3 not in ids["bad_endings"]  # the search's bans travel too
    assert config["decode"]["beam_size"] == 3 and config["preprocess"]["image_size"] == IMAGE_SIZE
    step = onnx.load(str(directory / FILES["step"]))
    assert [o.version for o in step.opset_import if o.domain in ("", "ai.onnx")] == [config["opset"]]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in step.graph.input}
    assert isinstance(dims["tokens"][0], str)  # rows = images x beams: symbolic
    if config["decoder"]["class"] == "TransformerDecoder":  # the key/value cache is an input
        assert all(isinstance(dims[k][0], str) and isinstance(dims[k][3], str)
                   for k in ("self_k", "self_v"))
        assert {o.name for o in step.graph.output} >= {"next_self_k", "next_self_v"}
    else:  # the grid stays one row per image while h/c have a row per beam
        assert config["decoder"]["static_state_keys"] == ["features", "prepared"]
        assert dims["features"][0] != dims["h"][0]


# ---- bad exports fail loudly, in one line ---------------------------------------------------------


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unsupported_decoder_is_refused_naming_it(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "co.ckpt", {**DECODERS["lstm"], "fusion": "coattention"})
    code = export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    line = one_error_line(capsys)
    assert code == 2 and str(ckpt) in line and "LSTMDecoder" in line and "coattention" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", [9, 99])
def test_unsupported_opset_is_refused(tmp_path, capsys, opset):
    ckpt = write_checkpoint(tmp_path / "m.ckpt", DECODERS["lstm"])
    code = export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                            "--opset", str(opset)])
    assert code == 2 and f"opset {opset} is not supported" in one_error_line(capsys)


@pytest.mark.parametrize("missing", [*FILES.values(), CONFIG])
def test_directory_missing_a_file_names_it(exported, tmp_path, capsys, missing):
    _, directory = exported
    broken = tmp_path / "export"
    shutil.copytree(directory, broken)
    (broken / missing).unlink()
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "red").save(image)
    assert caption_cli.main([str(image), "--onnx", str(broken)]) == 2
    assert str(broken / missing) in one_error_line(capsys)


def test_graph_with_another_opset_than_the_config_names_it(exported, tmp_path, capsys):
    _, directory = exported
    broken = tmp_path / "export"
    shutil.copytree(directory, broken)
    config = json.loads((broken / CONFIG).read_text())
    config["opset"] -= 1
    (broken / CONFIG).write_text(json.dumps(config))
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "red").save(image)
    assert caption_cli.main([str(image), "--onnx", str(broken)]) == 2
    line = one_error_line(capsys)
    assert str(broken / FILES["encoder"]) in line and f"opset {config['opset'] + 1}" in line


def test_half_precision_is_refused_for_an_export(exported, tmp_path, capsys):
    _, directory = exported
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "red").save(image)
    assert caption_cli.main([str(image), "--onnx", str(directory), "--precision", "bf16"]) == 2
    assert "fp32 only" in one_error_line(capsys)
