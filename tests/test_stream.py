"""Streams: exact resume, every key once in finite mode across ranks x workers, weighted mixing, bad samples."""
import logging
from collections import Counter

import pytest
import torch

from mmpt.data.media import DecodeSettings
from mmpt.data.resumable import Source
from mmpt.data.shards import list_shards, write_shards
from mmpt.data.stream import MultiTaskLoader, TaskConfig, TaskLoader, eval_loader
from mmpt.errors import DataError
from mmpt.train.loop import BadDataError, check_bad_fraction
from tests.media_files import png_bytes

SPEC = DecodeSettings(image_size=8, context_length=8)


def make_shards(path, prefix, n, per_shard, bad_every=0):
    def samples():
        for i in range(n):
            bad = bad_every and i % bad_every == 0
            yield {"__key__": f"{prefix}{i:04d}", "png": b"broken" if bad else png_bytes(8, 8, i % 250),
                   "txt": f"item {i}", "json": {"label": i % 5}}
    write_shards(samples(), path, prefix, per_shard)
    return str(path)


def task_loader(sources, workers=2, batch=4, seed=7):
    task = TaskConfig("image-text", ["image", "text"], sources, batch)
    return TaskLoader(task, SPEC, seed, num_workers=workers, slots=2, buffer=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_exactly_the_next_samples(tmp_path, workers):
    src = [Source("a", list_shards(make_shards(tmp_path / "a", "a", 60, 10)), ["image", "text"])]
    full = task_loader(src, workers)
    reference = [next(full) for _ in range(9)]
    first = task_loader(src, workers)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    resumed = task_loader(src, workers)
    resumed.load_state_dict(state)
    rest = [next(resumed) for _ in range(4)]
    assert [b["__key__"] for b in rest] == [b["__key__"] for b in reference[5:]]
    for a, b in zip(rest, reference[5:], strict=True):
        torch.testing.assert_close(a["image"], b["image"])  # augmentation is reproduced too
        torch.testing.assert_close(a["text"], b["text"])


def test_resume_rejects_a_different_worker_count(tmp_path):
    src = [Source("a", list_shards(make_shards(tmp_path / "a", "a", 20, 10)), ["image", "text"])]
    loader = task_loader(src, 2)
    next(loader)
    other = task_loader(src, 1)
    with pytest.raises(DataError, match="cannot resume exactly with 1 workers"):
        other.load_state_dict(loader.state_dict())


def test_two_ranks_two_workers_finite_see_every_key_once(tmp_path, monkeypatch):
    spec = make_shards(tmp_path / "f", "f", 50, 6)  # 9 shards, 4 readers
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for batch in eval_loader(spec, ["image", "text"], SPEC, batch_size=4, num_workers=2):
            seen += batch["__key__"]
    assert sorted(seen) == [f"f{i:04d}" for i in range(50)]


def test_weighted_mixing_follows_weights(tmp_path):
    a = Source("a", list_shards(make_shards(tmp_path / "a", "a", 40, 10)), ["image", "text"], weight=3.0)
    b = Source("b", list_shards(make_shards(tmp_path / "b", "b", 40, 10)), ["image", "text"], weight=1.0)
    loader = task_loader([a, b], workers=0, batch=20)
    keys = [k for _ in range(40) for k in next(loader)["__key__"]]
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.70 < share < 0.80


def test_training_stream_counts_bad_samples_by_reason_and_shard(tmp_path):
    src = [Source("bad", list_shards(make_shards(tmp_path / "x", "x", 30, 10, bad_every=3)), ["image", "text"])]
    loader = task_loader(src, workers=0, batch=10)
    reasons, shards = Counter(), Counter()
    for _ in range(6):
        skipped = next(loader)["_skipped"]
        reasons.update(skipped["reasons"])
        shards.update(skipped["shards"])
    assert set(reasons) == {"undecodable_image"} and reasons["undecodable_image"] >= 25
    assert all(url.endswith(".tar") for url in shards)


def test_bad_fraction_error_names_worst_shards():
    skipped = {"reasons": Counter(undecodable_image=30, missing_text=2),
               "shards": Counter({"s/x-1.tar": 25, "s/x-2.tar": 7})}
    message = r"32 of 132 .*undecodable_image=30.*worst shards: s/x-1.tar \(25\), s/x-2.tar"
    with pytest.raises(BadDataError, match=message):
        check_bad_fraction(skipped, 100, 0.1)
    check_bad_fraction(skipped, 100_000, 0.1)


def test_few_shards_warning_names_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    src = [Source("a", list_shards(make_shards(tmp_path / "a", "a", 10, 10)), ["image", "text"])]
    with caplog.at_level(logging.WARNING, logger="mmpt.data"):
        task_loader(src, workers=2)
    assert "1 shard(s) for 4 readers" in caplog.text and "smaller --shard-size" in caplog.text


def test_multitask_sampler_is_seeded_and_resumable(tmp_path):
    src = [Source("a", list_shards(make_shards(tmp_path / "a", "a", 20, 10)), ["image", "text"])]

    def loader():
        return MultiTaskLoader({"t1": task_loader(src, 0), "t2": task_loader(src, 0)}, {"t1": 1.0, "t2": 3.0}, seed=3)

    first = loader()
    names = [next(first)[0] for _ in range(40)]
    assert 0.6 < names.count("t2") / 40 < 0.9
    again = loader()
    for _ in range(25):
        next(again)
    resumed = loader()
    resumed.load_state_dict(again.state_dict())
    assert [next(resumed)[0] for _ in range(15)] == names[25:]
    other = MultiTaskLoader({"t1": task_loader(src, 0), "t3": task_loader(src, 0)}, {"t1": 1.0, "t3": 1.0}, seed=3)
    with pytest.raises(DataError, match=r"checkpoint's tasks \['t1', 't2'\] differ from this config's \['t1', 't3'\]"):
        other.load_state_dict(again.state_dict())


def test_a_late_task_joins_the_mix_at_its_start_step(tmp_path):
    """data.tasks.<pair>.start_step: never drawn before its step, drawn by weight after, and a resumed sampler
    keeps the schedule."""
    src = [Source("a", list_shards(make_shards(tmp_path / "a", "a", 20, 10)), ["image", "text"])]

    def loader():
        return MultiTaskLoader({"t1": task_loader(src, 0), "t2": task_loader(src, 0)}, {"t1": 1.0, "t2": 3.0},
                               seed=3, starts={"t2": 10})

    first = loader()
    names = [next(first)[0] for _ in range(40)]
    assert names[:10] == ["t1"] * 10 and names[10:].count("t2") > 15
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    again = loader()
    for _ in range(40):
        next(again)
    assert [next(resumed)[0] for _ in range(10)] == [next(again)[0] for _ in range(10)]


def test_a_worker_that_delivers_nothing_is_an_error_not_a_hang(tmp_path):
    """A shard on storage that never answers (a FIFO nobody writes): data.worker_timeout ends it in one line."""
    import os

    from mmpt.config import default_config

    fifo = tmp_path / "hang-000000.tar"
    os.mkfifo(fifo)
    task = TaskConfig("image-text", ["image", "text"], [Source("hang", [str(fifo)], ["image", "text"])], 2)
    loader = TaskLoader(task, DecodeSettings.from_config(default_config()), seed=0, num_workers=1, timeout=2)
    with pytest.raises(DataError, match=r"task 'image-text': no batch from its loader worker in 2 s"):
        next(loader)
    loader._it._shutdown_workers()  # the worker is still blocked opening the FIFO
