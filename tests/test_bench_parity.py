"""mmpt bench parity: both trainers run on tiny shards and the JSON contract holds."""
from __future__ import annotations

import io
import json
import math
import sys

from PIL import Image

from mmpt.data.shards import write_shards
from tests.conftest import run

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_samples(start: int, count: int):
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    for i in range(start, start + count):
        img = Image.fromarray((digits.images[i] * 15).astype("uint8"), mode="L").resize((32, 32))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        label = int(digits.target[i])
        yield {"__key__": f"d{i:05d}", "png": buf.getvalue(), "txt": f"the number {WORDS[label]} written by hand",
               "json": {"label": label}}


def test_bench_parity_contract(tmp_path):
    write_shards(digit_samples(0, 48), tmp_path / "train", "train", shard_size=16)
    write_shards(digit_samples(100, 20), tmp_path / "val", "val", shard_size=10)
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": WORDS, "templates": ["a handwritten {}"]}))
    out = tmp_path / "result.json"
    proc = run([sys.executable, "-m", "mmpt.cli", "bench", "parity", "--train", str(tmp_path / "train"),
                "--val", str(tmp_path / "val"), "--classes", str(tmp_path / "classes.json"), "--steps", "4",
                "--batch", "8", "--warmup", "1", "--lr", "1e-3", "--threads", "1", "--workers", "0", "--seeds", "0,1",
                "--equal-time", "--workdir", str(tmp_path / "work"), "--out", str(out)],
               timeout=900, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # stdout is the one JSON object
    assert printed == json.loads(out.read_text())
    assert [run["settings"]["seed"] for run in printed["runs"]] == [0, 1]
    check_one_seed(printed["runs"][0])
    summary = printed["summary"]
    for side in ("open_clip", "mmpt"):
        top1 = [run[side]["zeroshot"]["top1"] for run in printed["runs"]]
        assert summary[side]["top1"]["runs"] == top1 and math.isclose(summary[side]["top1"]["mean"], sum(top1) / 2)
        assert summary[side]["top1"]["min"] == min(top1) and summary[side]["s_per_step"]["std"] >= 0
    ratios = [run["summary"]["time_per_step_ratio"] for run in printed["runs"]]
    assert summary["time_per_step_ratio"]["max"] == max(ratios)  # the worst seed decides the target
    assert summary["meets_target"] == bool(summary["top1_ratio"] and summary["top1_ratio"]["min"] >= 1.0
                                           and max(ratios) <= 0.7)
    check_equal_time(printed)


def check_equal_time(printed: dict) -> None:
    """--equal-time: mmpt trained again for open_clip's steps x the measured s/step ratio, scored the same way."""
    for r in printed["runs"]:
        eq, sps = r["equal_time"], r["summary"]["s_per_step"]
        assert eq["steps"] == max(4, round(4 * sps["open_clip"] / sps["mmpt"]))
        theirs = r["open_clip"]["zeroshot"]["top1"]
        assert eq["top1_ratio"] is None if theirs == 0 else math.isclose(eq["top1_ratio"], eq["top1"] / theirs)
        assert eq["train_s"]["open_clip"] > 0 and eq["train_s"]["mmpt"] > 0
    same_time = printed["summary"]["equal_time"]
    assert same_time["steps"] == [r["equal_time"]["steps"] for r in printed["runs"]]
    assert same_time["top1"]["runs"] == [r["equal_time"]["top1"] for r in printed["runs"]]


def check_one_seed(printed: dict) -> None:
    for side in ("open_clip", "mmpt"):
        r = printed[side]
        assert r["steps"] == 4
        losses = r["losses"]
        for name in ("loss", "caption_loss"):
            assert losses[name]["finite"] and losses[name]["first"] != losses[name]["last"], (side, name)
        assert 0.0 <= r["zeroshot"]["top1"] <= 1.0 and r["zeroshot"]["num_samples"] == 20
        assert r["timing"]["s_per_step"] > 0 and r["timing"]["cpu_s_per_step"] > 0 and r["wall_s"] > 0
        assert r["params"]["total"] > 0 and r["flops_per_sample"]["train_forward"] > 0
        assert "BPE" in r["tokenizer"]
    assert printed["open_clip"]["losses"]["contrastive_loss"]["finite"]
    assert printed["mmpt"]["losses"]["contrastive_loss/image-text"]["finite"]

    s = printed["summary"]
    theirs, ours = printed["open_clip"]["zeroshot"]["top1"], printed["mmpt"]["zeroshot"]["top1"]
    assert s["top1_ratio"] is None if theirs == 0 else math.isclose(s["top1_ratio"], ours / theirs)
    assert s["time_per_step_ratio"] > 0
    # the same settings reached both trainers
    argv = printed["open_clip"]["argv"]
    assert argv[argv.index("--batch-size") + 1] == "8" and argv[argv.index("--lr") + 1] == "0.001"
    assert printed["mmpt"]["command"].startswith("mmpt train --config demo ")  # --mmpt-config's default
    assert "data.batch_size=8" in printed["mmpt"]["overrides"] and "optim.lr=0.001" in printed["mmpt"]["overrides"]
    assert printed["settings"]["shape"]["width"] == printed["open_clip"]["model_config"]["vision_cfg"]["width"]
