"""Hostile and broken requests, fired at a running server together with valid ones: each is a 4xx
with one line, every valid request still succeeds, and the server's memory stays bounded."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
from PIL import Image
from serve_helpers import jpeg


def _png(width, height) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")  # 20000 x 20000 of one bit: ~50 kB
    return buf.getvalue()


def _gif(frames: int) -> bytes:
    # consecutive frames differ (Pillow merges equal ones): red, black, red, ...
    images = [Image.new("RGB", (16, 16), (255 * (i % 2), 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == frames
    return buf.getvalue()


async def _chunks(total: int, size: int = 1 << 20):
    for _ in range(total // size):  # no Content-Length: sent chunked
        yield b"\0" * size


def hostile_requests() -> dict[str, tuple[int, dict]]:
    """name -> (expected status, httpx request arguments)."""
    good = jpeg()
    b64 = base64.b64encode(good).decode()
    truncated = jpeg(320, 240, "green")
    boundary = "xXx"
    return {
        "not an image": (422, {"files": {"image": ("notes.txt", b"just some text, not a photo")}}),
        "truncated JPEG": (422, {"files": {"image": ("cut.jpg", truncated[: len(truncated) // 2])}}),
        "empty file": (400, {"files": {"image": ("empty.jpg", b"")}}),
        "empty body": (400, {"content": b"", "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}),
        "no body, no type": (415, {}),
        "raw bytes, no form": (415, {"content": good, "headers": {"Content-Type": "image/jpeg"}}),
        "wrong field name": (400, {"files": {"photo": ("a.jpg", good)}}),
        "two files": (400, {"files": [("image", ("a.jpg", good)), ("image", ("b.jpg", good))]}),
        "decompression bomb 20000x20000": (422, {"files": {"image": ("bomb.png", _png(20000, 20000))}}),
        "100 MB body": (413, {"files": {"image": ("huge.jpg", b"\0" * (100 << 20))}}),
        "100 MB chunked body": (413, {"content": _chunks(100 << 20), "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}),
        "GIF with 1000 frames": (422, {"files": {"image": ("anim.gif", _gif(1000))}}),
        "unknown parameter": (400, {"files": {"image": ("a.jpg", good)}, "data": {"temperature": "2"}}),
        "unknown JSON key": (400, {"json": {"image": b64, "beam": 3}}),
        "beam size 0": (400, {"files": {"image": ("a.jpg", good)}, "data": {"beam_size": "0"}}),
        "beam size 1000": (400, {"json": {"image": b64, "beam_size": 1000}}),
        "beam size not a number": (400, {"json": {"image": b64, "beam_size": "three"}}),
        "max length 10000": (400, {"json": {"image": b64, "max_length": 10000}}),
        "alternatives over beam": (400, {"json": {"image": b64, "beam_size": 2, "alternatives": 5}}),
        "broken JSON": (400, {"content": b'{"image": ', "headers": {"Content-Type": "application/json"}}),
        "JSON not an object": (400, {"json": [1, 2, 3]}),
        "JSON without image": (400, {"json": {"beam_size": 3}}),
        "not base64": (400, {"json": {"image": "%%% not base64 %%%"}}),
        "malformed multipart": (400, {"content": b"--xXx\r\nnonsense", "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}),
    }


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def test_hostile_requests_interleaved_with_valid_ones(caption_server):
    cases = list(hostile_requests().items())
    rss_before = _tree_rss_mb(caption_server.pid)

    async def fire():
        async with httpx.AsyncClient(base_url=caption_server.url, timeout=120) as client:
            sent = []  # (name, expected status or None for a valid request, request)
            for i, (name, (status, kwargs)) in enumerate(cases):
                sent.append((name, status, client.post("/caption", **kwargs)))
                if i % 2 == 0:
                    photo = jpeg(color=(0, 9 * i, 0))
                    sent.append((f"valid {i}", None,
                                 client.post("/caption", files={"image": (f"ok{i}.jpg", photo)})))
            answers = await asyncio.gather(*[request for _, _, request in sent])
            return [(name, status, r) for (name, status, _), r in zip(sent, answers)]

    answers = asyncio.run(fire())
    for name, status, r in answers:
        body = r.json()
        if status is None:
            assert r.status_code == 200 and body["words"], (name, r.status_code, body)
            continue
        assert r.status_code == status, (name, r.status_code, body)
        detail = body["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, (name, detail)
        assert "Traceback" not in detail and 'File "' not in detail, (name, detail)
    assert sum(status is None for _, status, _ in answers) == (len(cases) + 1) // 2
    assert httpx.get(caption_server.url + "/health").text == "ok"
    ok = httpx.post(caption_server.url + "/caption", files={"image": ("last.jpg", jpeg())}, timeout=60)
    assert ok.status_code == 200
    # nothing of the 100 MB bodies or the 400-Mpixel bomb stayed (or was ever held whole)
    grown = _tree_rss_mb(caption_server.pid) - rss_before
    assert grown < 150, f"server memory grew by {grown:.0f} MB"
