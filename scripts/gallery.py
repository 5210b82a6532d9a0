"""A picture of a model's captions on a split: photos evenly spaced through the split (not picked
by hand), the model's caption under each and the first human reference in grey.

    python scripts/gallery.py --checkpoint PATH [--data flickr8k] [--split test] [--num 8]
                              [--out docs/flickr8k_test_captions.png] [--beam-size N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    from captioner.checkpoint import load_checkpoint
    from captioner.inference import caption_files, decode_settings
    from captioner.viz.gallery import save_gallery

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", default="flickr8k", help="a folder of ../shared/data")
    p.add_argument("--split", default="test")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    root = ROOT.parent / "shared" / "data" / args.data
    doc = json.loads((root / "annotations" / f"captions_{args.split}.json").read_text())
    images = sorted(doc["images"], key=lambda i: i["id"])
    step = max(len(images) // args.num, 1)
    picked = images[::step][: args.num]
    refs = {}
    for a in doc["annotations"]:
        refs.setdefault(a["image_id"], a["caption"])
    model, tokenizer, payload = load_checkpoint(args.checkpoint)
    decode = decode_settings(payload["decode"], {"beam_size": args.beam_size})
    paths = [root / "images" / i["file_name"] for i in picked]
    results = caption_files(model, tokenizer, paths, payload["image_size"], decode)
    items = [{"path": r["path"], "caption": r.get("caption", r.get("error", "")),
              "reference": refs[i["id"]].strip().rstrip(" .").lower()}
             for r, i in zip(results, picked)]
    out = args.out or ROOT / "docs" / f"{args.data}_{args.split}_captions.png"
    save_gallery(items, out)
    for it in items:
        print(f"{Path(it['path']).name}: {it['caption']}   (human: {it['reference']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
