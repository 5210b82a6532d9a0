"""The README's picture of the web page: a served checkpoint, a photo, one word hovered.

    python scripts/serve_screenshot.py --checkpoint outputs/train/runs/<run>/checkpoints/best.ckpt \\
        [--photo PHOTO | --seed 3] [--word 1] [--out docs/serve_page.png]

Without ``--photo`` it draws a scene of the embedded set at 320 px (``--seed``), the kind of
picture ``make demo``'s model was trained on. Drives Debian's ``chromium`` headless through
Playwright, as ``tests/serve/test_serve_page.py`` does."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from captioner.data.synthetic import make_scene, render
from captioner.serve.launch import served

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--photo", type=Path, default=None)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--word", type=int, default=1, help="index of the word to hover")
    p.add_argument("--out", type=Path, default=Path("docs/serve_page.png"))
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo
        if photo is None:
            photo = Path(tmp) / "scene.png"
            render(make_scene(np.random.default_rng(args.seed), image_size=320)).save(photo)
        with served(["--checkpoint", args.checkpoint], timeout=1500) as server, \
                sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(Path(tmp) / "profile"), executable_path=shutil.which("chromium"),
                headless=True, args=ARGS, viewport={"width": 1000, "height": 560})
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model-line').textContent.includes('vocabulary')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#caption .word", timeout=120_000)
            words = page.locator("#caption .word")
            words.nth(min(args.word, words.count() - 1)).hover()
            page.wait_for_function("document.getElementById('heat').dataset.word !== undefined")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            print(f"{page.locator('#caption').inner_text()!r} -> {args.out}")
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
