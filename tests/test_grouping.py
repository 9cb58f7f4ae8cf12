"""Grouped batches (data.tasks.<pair>.group_by): runs of samples sharing a json field, resumed exactly, nothing lost."""
import pytest
import torch

from mmpt.config import load_config
from mmpt.data.media import DecodeSettings
from mmpt.data.resumable import Grouping, SkipCounter, Source, WorkerStream, group_of
from mmpt.data.shards import list_shards, write_shards
from mmpt.data.stream import TaskConfig, TaskLoader, tasks_from_config
from mmpt.errors import ConfigError
from tests.media_files import png_bytes

SPEC = DecodeSettings(image_size=8, context_length=8)


def make_shards(path, n, per_shard, labels=5):
    def samples():
        for i in range(n):
            meta = {"label": i % labels, "colour": ["red", "blue"][i % 2]} if i % 7 else {"colour": "red"}
            yield {"__key__": f"s{i:04d}", "png": png_bytes(8, 8, i % 250), "txt": f"item {i}", "json": meta}
    write_shards(samples(), path, "s", per_shard)
    return list_shards(str(path))


def grouped_loader(urls, workers, batch, size, field="label"):
    task = TaskConfig("image-text", ["image", "text"], [Source("a", urls, ["image", "text"])], batch,
                      grouping=Grouping(field, size))
    return TaskLoader(task, SPEC, 7, num_workers=workers, slots=2, buffer=16)


def runs(labels: list, size: int) -> list:
    return [labels[i:i + size] for i in range(0, len(labels), size)]


def test_batches_are_runs_of_one_label(tmp_path):
    loader = grouped_loader(make_shards(tmp_path / "a", 120, 20), workers=0, batch=8, size=4)
    labels = [lab for _ in range(30) for lab in next(loader)["label"].tolist()]
    assert all(len(set(run)) == 1 for run in runs(labels, 4))
    # every label turns up: a run's group is drawn from what the buffer holds, not stuck on one
    assert set(labels) == {-1, 0, 1, 2, 3, 4}


def test_ungrouped_batches_mix_labels(tmp_path):
    task = TaskConfig("image-text", ["image", "text"], [Source("a", make_shards(tmp_path / "a", 120, 20),
                                                               ["image", "text"])], 8)
    loader = TaskLoader(task, SPEC, 7, num_workers=0, slots=2, buffer=16)
    labels = [lab for _ in range(30) for lab in next(loader)["label"].tolist()]
    assert sum(len(set(run)) == 1 for run in runs(labels, 4)) < 10  # of 60 runs: grouping is the option's work


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_run_continues_with_exactly_the_next_samples(tmp_path, workers):
    urls = make_shards(tmp_path / "a", 120, 20)
    # runs of 6 across batches of 4: a batch ends inside a run, so the run's group and remainder are in the state
    full = grouped_loader(urls, workers, batch=4, size=6)
    reference = [next(full) for _ in range(9)]
    first = grouped_loader(urls, workers, batch=4, size=6)
    for _ in range(5):
        next(first)
    resumed = grouped_loader(urls, workers, batch=4, size=6)
    resumed.load_state_dict(first.state_dict())
    rest = [next(resumed) for _ in range(4)]
    assert [b["__key__"] for b in rest] == [b["__key__"] for b in reference[5:]]
    for a, b in zip(rest, reference[5:], strict=True):
        torch.testing.assert_close(a["image"], b["image"])


def test_every_drawn_sample_is_handed_out_or_still_buffered(tmp_path):
    urls = make_shards(tmp_path / "a", 60, 20)
    stream = WorkerStream([Source("a", urls, ["image", "text"])], 3, 0, 0, 2, 16, SkipCounter(None),
                          grouping=Grouping("label", 4))
    out = [next(it) for it in [iter(stream)] for _ in range(200)]
    assert len(out) + len(stream.buffer) == stream.drawn
    assert len(stream.buffer) <= 2 * 16  # a scarce group draws at most one buffer more


def test_a_sample_without_the_field_is_a_group_of_its_own():
    assert group_of({"json": b'{"label": 3}'}, "label") == "3"
    assert group_of({"json": b'{"colour": "red"}'}, "label") is None
    assert group_of({"json": b"not json"}, "label") is None
    assert group_of({"png": b""}, "label") is None


def test_config_sets_the_grouping_and_checks_it():
    cfg = load_config("demo", ["data.tasks.video-audio.group_by=label", "data.tasks.video-audio.group_size=8"])
    tasks, _ = tasks_from_config(cfg, expand=False)
    assert tasks["video-audio"].grouping == Grouping("label", 8)
    assert tasks["video-text"].grouping is None
    with pytest.raises(ConfigError, match=r"data.tasks.video-audio.group_size=5: must be >= 2 and divide .* 32"):
        load_config("demo", ["data.tasks.video-audio.group_by=label", "data.tasks.video-audio.group_size=5"])
    with pytest.raises(ConfigError, match=r"video-audio.group_size=8: needs data.tasks.video-audio.group_by"):
        load_config("demo", ["data.tasks.video-audio.group_size=8"])
