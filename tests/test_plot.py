"""plot_run: PNGs from a run's metrics.jsonl, figures without data left out, clear errors for bad files."""
import json

import pytest
from PIL import Image

from mmpt.errors import DataError
from mmpt.plot import figures, plot_run, read_records


def write_metrics(run, records) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def synthetic(steps: int = 40, with_eval: bool = True) -> list:
    records = []
    for step in range(1, steps + 1):
        task = ["image-text", "video-audio"][step % 2]  # alternating tasks log only their own pair
        pair_loss = {f"contrastive_loss/{task}": 3.0 / step, f"logit_scale/{task}": 14.0 + step / 10}
        modalities = task.split("-")
        moe = {f"moe/{m}/{metric}": 0.1 * (step % 5) + i for i, m in enumerate(modalities)
               for metric in ("max_load", "dropped_rate", "router_entropy")}
        record = {"step": step, "time": 1000.0 + step, "task": task, "loss": 4.0 / step, "lr": 1e-3 * step / steps,
                  "samples_per_s": 50.0 + step, **pair_loss, **moe}
        if task == "image-text":
            record["caption_loss"] = 9.0 / step
        records.append(record)
        if with_eval and step % 10 == 0:
            records.append({"step": step, "time": 1000.5 + step, "eval/zeroshot/image/val/top1": step / 50,
                            "eval/retrieval/image-text/val/image_to_text/R@1": step / 60})
    return records


def test_plot_run_writes_valid_pngs(tmp_path):
    write_metrics(tmp_path / "run", synthetic())
    paths = plot_run(tmp_path / "run")
    assert sorted(p.name for p in paths) == ["contrastive.png", "eval.png", "loss.png", "lr.png", "moe.png",
                                             "throughput.png"]
    for path in paths:
        assert path.parent == tmp_path / "run" / "plots"
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.width > 0 and im.height > 0


def test_lines_follow_each_tasks_own_steps_and_absent_keys_skip_figures(tmp_path):
    records = synthetic(with_eval=False)
    for r in records:
        for key in [k for k in r if k.startswith("moe/")]:
            del r[key]
    plan = figures(records)
    assert set(plan) == {"loss", "contrastive", "lr", "throughput"}
    (_, loss), (_, caption) = plan["loss"]
    assert set(loss) == {"image-text", "video-audio"} and set(caption) == {"image-text"}
    assert loss["image-text"][0] == list(range(2, 41, 2))
    assert set(plan["contrastive"][0][1]) == {"image-text", "video-audio"}
    write_metrics(tmp_path / "run", records)
    paths = plot_run(tmp_path / "run", tmp_path / "elsewhere")
    assert sorted(p.name for p in paths) == ["contrastive.png", "loss.png", "lr.png", "throughput.png"]
    assert all(p.parent == tmp_path / "elsewhere" for p in paths)


def test_missing_empty_or_broken_metrics_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl: no such file"):
        plot_run(tmp_path / "nothing")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(DataError, match="metrics.jsonl: no records"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n{"step": 3, "loss": 1}\n')
    with pytest.raises(DataError, match="metrics.jsonl:2: not a JSON record"):
        plot_run(tmp_path)
    # A torn last line is a run still writing: plotted without it.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo')
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1]
