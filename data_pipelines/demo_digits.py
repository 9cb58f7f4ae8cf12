"""Embedded demo dataset: scikit-learn's 1,797 real handwritten digits as image-text webdataset shards.

    python data_pipelines/demo_digits.py --out data/demo

Writes `train/` and `val/` shard directories (PNG + caption + json label, with sizes.json) and
`classes.json` (class names and prompt templates for zero-shot). The held-out split is fixed (seeded
permutation), so every run evaluates on the same 297 digits. Skips the work when the output is complete.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mmpt.data.shards import SIZES_FILE, write_shards

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a photo of the digit {word}",
    "a scanned handwritten {num}",
    "the digit {word}, handwritten",
    "a small hand drawn {word}",
    "a blurry picture of the number {word}",
    "handwriting: {num}",
]
# Zero-shot prompts: some share the training captions' style, some are new phrasings.
PROMPTS = ["a handwritten digit {}", "the number {} written by hand", "a photo of the digit {}",
           "a drawing of the number {}", "an image of a {}"]
NUM_VAL = 297
PIXELS = 64


def digit_png(pixels8x8: np.ndarray) -> bytes:
    """8x8 grey levels 0..16 -> white-on-black 64x64 PNG (bicubic upscaling, as a scanner would blur)."""
    img = Image.fromarray((pixels8x8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    img = img.resize((PIXELS, PIXELS), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def samples(images: np.ndarray, labels: np.ndarray, index: list, seed: int):
    rng = random.Random(seed)
    for i in index:
        label = int(labels[i])
        caption = rng.choice(CAPTIONS).format(word=WORDS[label], num=label)
        yield {"__key__": f"digit{i:05d}", "png": digit_png(images[i]), "txt": caption,
               "json": {"label": label, "source_index": int(i), "class": WORDS[label]}}


def is_complete(out: Path) -> bool:
    return all((out / part / SIZES_FILE).is_file() for part in ("train", "val")) and (out / "classes.json").is_file()


def build(out: Path, shard_size: int = 200, seed: int = 0, force: bool = False) -> dict:
    if is_complete(out) and not force:
        return {"skipped": True, "out": str(out)}
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target)).tolist()
    val_index, train_index = sorted(order[:NUM_VAL]), order[NUM_VAL:]
    report = {}
    for part, index in (("train", train_index), ("val", val_index)):
        rep = write_shards(samples(digits.images, digits.target, index, seed), out / part, f"digits-{part}", shard_size)
        report[part] = rep.summary()
    (out / "classes.json").write_text(json.dumps({"classnames": WORDS, "templates": PROMPTS}, indent=1) + "\n")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/demo", type=Path)
    ap.add_argument("--shard-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = ap.parse_args(argv)
    report = build(args.out, args.shard_size, args.seed, args.force)
    if report.get("skipped"):
        print(f"demo shards already complete in {args.out}; skipping (use --force to rebuild)")
    else:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
