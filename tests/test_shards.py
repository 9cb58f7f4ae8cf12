import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmpt.data.media import DecodeSettings
from mmpt.data.shards import list_shards, read_sizes, write_shards
from mmpt.data.stream import eval_loader
from mmpt.data.tokenizer import decode
from mmpt.errors import DataError


def png(value: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_all(spec, batch_size=4):
    loader = eval_loader(spec, ["image", "text"], DecodeSettings(image_size=16, context_length=16), batch_size)
    keys, labels, texts, skipped = [], [], [], {}
    for batch in loader:
        for reason, n in batch["_skipped"]["reasons"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        if not batch["__key__"]:  # a batch of bad samples only: counted, nothing to decode
            continue
        keys += batch["__key__"]
        labels += batch["label"].tolist()
        texts += [decode(t.tolist(), 16) for t in batch["text"]]
        assert batch["image"].shape[1:] == (3, 16, 16)
    return keys, labels, texts, skipped


def test_write_then_read_round_trip(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "png": png(i * 20), "txt": f"caption number {i}", "json": {"label": i % 3}}
               for i in range(10)]
    report = write_shards(samples, tmp_path, "rt", shard_size=4)
    assert report.written == 10 and report.shards == ["rt-000000.tar", "rt-000001.tar", "rt-000002.tar"]
    assert read_sizes(tmp_path) == {"rt-000000.tar": 4, "rt-000001.tar": 4, "rt-000002.tar": 2}
    with tarfile.open(tmp_path / "rt-000000.tar") as tar:
        assert sorted(tar.getnames())[:3] == ["s000.json", "s000.png", "s000.txt"]
    keys, labels, texts, skipped = read_all(str(tmp_path))
    assert keys == [f"s{i:03d}" for i in range(10)]
    assert labels == [i % 3 for i in range(10)]
    assert texts == [f"caption number {i}" for i in range(10)]
    assert skipped == {}
    (tmp_path / "other-000000.tar").write_bytes(b"")  # another set's shard in the same folder stays
    write_shards(samples, tmp_path, "rt", shard_size=8)  # a rewrite as fewer shards drops the old tail
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["other-000000.tar", "rt-000000.tar", "rt-000001.tar"]
    assert read_sizes(tmp_path) == {"rt-000000.tar": 8, "rt-000001.tar": 2}


def test_bad_samples_are_skipped_and_counted(tmp_path):
    samples = [
        {"__key__": "good", "png": png(10), "txt": "fine", "json": {"label": 1}},
        {"__key__": "broken", "png": b"not a png at all", "txt": "x", "json": {"label": 1}},
        {"__key__": "nocap", "png": png(10), "json": {"label": 1}},
        {"__key__": "emptycap", "png": png(10), "txt": "   ", "json": {"label": 1}},
        {"__key__": "noimage", "txt": "only text", "json": {"label": 1}},
        {"__key__": "badjson", "png": png(10), "txt": "y", "json": b"{not json"},
    ]
    write_shards(samples, tmp_path, "bad", shard_size=10)
    keys, _, _, skipped = read_all(str(tmp_path))
    assert keys == ["good"]
    assert skipped == {"undecodable_image": 1, "missing_text": 1, "empty_text": 1, "missing_image": 1,
                       "bad_json": 1}


def test_truncated_tar_is_counted_not_fatal(tmp_path):
    samples = [{"__key__": f"k{i}", "png": png(i), "txt": "t", "json": {"label": 0}} for i in range(6)]
    write_shards(samples, tmp_path, "tr", shard_size=3)
    shard = tmp_path / "tr-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside the first member
    keys, _, _, skipped = read_all(str(tmp_path))
    assert keys[:3] == ["k0", "k1", "k2"]
    assert skipped.get("corrupt_tar", 0) >= 1


def test_list_shards_errors(tmp_path):
    with pytest.raises(DataError, match="sizes.json"):
        list_shards(str(tmp_path))
    with pytest.raises(DataError, match="matches no shards"):
        list_shards(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match=r"2 shard\(s\) missing, first: .*x-000000.tar"):
        list_shards(str(tmp_path / "x-{000000..000001}.tar"))


def test_demo_builder_is_complete_and_idempotent(demo_data):
    train, val = read_sizes(demo_data / "train"), read_sizes(demo_data / "val")
    assert sum(train.values()) == 1500 and sum(val.values()) == 297
    classes = json.loads((demo_data / "classes.json").read_text())
    assert len(classes["classnames"]) == 10 and all("{}" in t for t in classes["templates"])
    proc = subprocess.run([sys.executable, "data_pipelines/demo_digits.py", "--out", str(demo_data),
                           "--shard-size", "100"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "skipping" in proc.stdout
