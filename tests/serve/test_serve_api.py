"""POST /caption, /health, /info, the OpenAPI document and the page, against a running server."""

from __future__ import annotations

import asyncio
import base64

import httpx
import torch
from serve_helpers import jpeg

from captioner.checkpoint import load_checkpoint
from captioner.inference import caption_files, decode_settings


def test_health_info_page_and_openapi(caption_server):
    server = caption_server.url
    assert httpx.get(server + "/health").text == "ok"
    model = httpx.get(server + "/info").json()["model"]
    assert model["vocab_size"] > 4 and model["encoder"]["name"] == "resnet18"
    assert model["decode"]["beam_size"] == 3 and model["decode"]["max_length"] == 8
    assert model["grid"] == [4, 4] and model["batching"]["max_batch_size"] == 8
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<canvas id=\"heat\"" in page.text
    assert httpx.get(server + "/static/app.js").status_code == 200
    spec = httpx.get(server + "/openapi.json").json()
    body = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"CaptionJSON", "CaptionUpload", "CaptionResponse"} <= set(spec["components"]["schemas"])


def test_multipart_and_json_give_the_caption_caption_py_gives(caption_server, serve_checkpoint, tmp_path):
    server = caption_server.url
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(80, 60, "blue"))
    model, tok, payload = load_checkpoint(serve_checkpoint)
    expected = caption_files(model, tok, [photo], payload["image_size"],
                             decode_settings(payload["decode"]))[0]
    upload = httpx.post(server + "/caption", files={"image": ("photo.jpg", photo.read_bytes())},
                        timeout=60).json()
    as_json = httpx.post(server + "/caption", json={
        "image": base64.b64encode(photo.read_bytes()).decode()}, timeout=60).json()
    for body in (upload, as_json):
        assert body["caption"] == expected["caption"] and body["words"] == expected["words"]
        assert abs(body["score"] - expected["score"]) < 1e-3
        assert body["settings"] == {"beam_size": 3, "max_length": 8, "alternatives": 1}
        assert body["image"] == {"width": 80, "height": 60} and "attention" not in body


def test_options_alternatives_and_attention(caption_server):
    server = caption_server.url
    r = httpx.post(server + "/caption", files={"image": ("a.jpg", jpeg())}, timeout=60,
                   data={"beam_size": "4", "max_length": "5", "alternatives": "3",
                         "attention": "true"})
    body = r.json()
    assert r.status_code == 200, body
    assert body["settings"] == {"beam_size": 4, "max_length": 5, "alternatives": 3}
    scores = [a["score"] for a in body["alternatives"]]
    assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    assert body["alternatives"][0]["caption"] == body["caption"]
    grid = body["attention"]
    assert grid["grid"] == [4, 4] and grid["words"] == body["words"]
    weights = torch.tensor(grid["weights"])  # (L, R)
    assert weights.shape == (len(body["words"]), 16)
    assert torch.allclose(weights.sum(1), torch.ones(len(body["words"])), atol=1e-3)
    greedy = httpx.post(server + "/caption", json={
        "image": base64.b64encode(jpeg()).decode(), "beam_size": 1}, timeout=60).json()
    assert greedy["settings"]["beam_size"] == 1 and len(greedy["alternatives"]) == 1


def test_requests_arriving_together_share_one_batched_search(caption_server):
    server = caption_server.url
    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/caption", files={"image": (f"{i}.jpg", jpeg(color=(i * 30, 0, 0)))})
                for i in range(8)])

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    # 8 requests sent at once: they cannot all have gone alone (the batch window is 20 ms)
    assert max(r.json()["batch_size"] for r in answers) > 1
