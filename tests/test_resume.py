"""The pieces of exact resume that need no process group: which checkpoint to resume from, the config check,
per-rank seeds and RNG states, metrics without repeated steps."""
import json
import random

import torch

from mmpt.train.resume import choose_tag, config_changes, rank_seed, rng_state, seed_rank, set_rng_state
from mmpt.train.runlog import read_metrics, truncate_metrics


def make_tag(ckpt, name, complete=True):
    (ckpt / name).mkdir(parents=True)
    if complete:
        (ckpt / name / "mp_rank_00_model_states.pt").write_bytes(b"x")


def test_latest_when_complete(tmp_path):
    make_tag(tmp_path, "step0000010")
    make_tag(tmp_path, "step0000020")
    (tmp_path / "latest").write_text("step0000020")
    said = []
    assert choose_tag(tmp_path, said.append) == "step0000020" and said == []


def test_falls_back_to_newest_complete_and_says_so(tmp_path):
    make_tag(tmp_path, "step0000010")
    make_tag(tmp_path, "step0000020", complete=False)  # DeepSpeed's latest written, shards not
    make_tag(tmp_path, "step0000030.tmp")  # a save that died before its rename
    (tmp_path / "latest").write_text("step0000020")
    said = []
    assert choose_tag(tmp_path, said.append) == "step0000010"
    assert any("step0000030.tmp" in s and "ignoring" in s for s in said)
    assert any("'latest' names step0000020, which is missing or incomplete; resuming from step0000010" in s
               for s in said)


def test_no_checkpoint(tmp_path):
    assert choose_tag(tmp_path / "none", print) is None
    make_tag(tmp_path, "best")  # the best-eval tag is never resumed from
    assert choose_tag(tmp_path, print) is None


def test_config_changes_name_model_keys_and_tasks():
    run = {"model": {"width": 32, "dropout": 0.0, "moe": {"num_experts": 4, "eval_capacity_factor": 2.0}},
           "data": {"sources": [{"modalities": ["text", "image"]}]}}
    same = json.loads(json.dumps(run))
    same["model"]["dropout"] = 0.1  # a training knob, free to change
    same["model"]["moe"]["eval_capacity_factor"] = 4.0
    assert config_changes(run, same) == []
    other = json.loads(json.dumps(run))
    other["model"]["moe"]["num_experts"] = 8
    other["data"]["sources"].append({"modalities": ["audio", "text"]})
    assert config_changes(run, other) == ["model.moe.num_experts: 4 -> 8",
                                          "tasks: ['image-text'] -> ['audio-text', 'image-text']"]


def test_rank_seeds_differ_and_rng_state_round_trips():
    assert len({rank_seed(0, r) for r in range(64)}) == 64 and rank_seed(0, 1) != rank_seed(1, 1)
    seed_rank(0, 1)
    state = rng_state()
    a = (torch.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 14)) + '{"step": 14, "lo')
    truncate_metrics(path, 10)  # the run died while writing step 14's line
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 11))
