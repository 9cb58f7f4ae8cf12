"""An eval added in one file runs from the CLI and during training: the eval registry (mmpt.evals) gives the CLI
its `mmpt eval NAME` sub-parsers, training its `eval.NAME` lists and metric keys, and the model card its rows.

The plugin here is ONE module file written into tmp_path (the mean cosine similarity of paired image and text
embeddings, times a `scale` field of its own); only subprocesses import it, so this process's registry (and
the config schema composed from it) never holds it. In-process tests register entries with monkeypatch."""
from __future__ import annotations

import json
import os
import random
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from mmpt.cli import build_parser, eval_request, main
from mmpt.config import load_config
from mmpt.errors import ConfigError, DataError
from mmpt.eval.caption import CaptionEval
from mmpt.eval.retrieval import RetrievalEval
from mmpt.eval.zeroshot import ZeroShotEval
from mmpt.evals import EVALS, Eval
from mmpt.export import eval_rows
from mmpt.train import loop
from mmpt.train.evaluate import check_eval_inputs, eval_due, run_evals
from mmpt.train.runlog import read_metrics
from tests.conftest import run

PLUGIN = "mmpt_test_paircos"
PLUGIN_SOURCE = '''
    """An eval in one file: the mean cosine similarity of paired image and text embeddings, times `scale`."""
    from dataclasses import dataclass
    from pathlib import Path
    from typing import Optional

    import torch
    import torch.nn.functional as F

    from mmpt.eval.data import eval_batches, model_inputs
    from mmpt.evals import Eval, register


    @dataclass
    class PairCosine:
        data: Optional[str] = None  # shards of image-text pairs; None: data.val
        scale: float = 1.0  # a field of its own: --scale on the command line, eval.paircos[i].scale in a config


    @torch.no_grad()
    def run(model, cfg, item, batch_size=None, workers=None, **options):
        data, total, n = item.data or cfg.data.val, 0.0, 0
        batches = eval_batches(data, ["image", "text"], cfg, batch_size or cfg.eval.batch_size,
                               cfg.eval.workers if workers is None else workers, labels=False)
        for batch in batches:
            if batch["__key__"]:
                a, b = (F.normalize(model.encode(m, model_inputs(model, batch, m))["emb"].float(), dim=-1)
                        for m in ("image", "text"))
                total, n = total + float((a * b).sum()), n + len(a)
        return {"mean_cosine": item.scale * total / n, "num_samples": n, "data": data}


    register(Eval("paircos", PairCosine, run, metrics=("mean_cosine",),
                  label=lambda cfg, item: Path(item.data or cfg.data.val).name,
                  check=lambda cfg, item: None if item.scale > 0 else f"scale={item.scale}: must be positive"))
'''
TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=32", "data.batch_size=16",
        "train.log_every=2", "train.ckpt_every=4", "optim.warmup_steps=2", "eval.workers=0", "data.num_workers=1"]
COSINE, BLEU, CIDER = "eval/paircos/val/mean_cosine", "eval/caption/image/val/bleu4", "eval/caption/image/val/cider"


def plugin_env(root) -> dict:
    (root / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """A 4-step image-text run evaluating every 2 steps: the demo's zero-shot and retrieval, the caption eval and
    the plugin's eval (named in `plugins`, configured as eval.paircos)."""
    root = tmp_path_factory.mktemp("registry")
    env = plugin_env(root)
    out = root / "run"
    proc = run([sys.executable, "-m", "mmpt.cli", "train", "--config", "demo", *TINY, "model.modalities=[image, text]",
                f"data.sources=[{{name: digits, shards: {demo_data}/train, modalities: [image, text]}}]",
                f"data.val={demo_data}/val", f"data.classes={demo_data}/classes.json", f"train.out_dir={out}",
                "train.steps=4", "eval.every=2", f"plugins=[{PLUGIN}]", "eval.paircos=[{scale: 1.0}]",
                "eval.caption=[{modality: image}]"], env={**env, "MASTER_PORT": str(random.randint(20000, 40000))})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"run": out, "root": root, "env": env, "metrics": read_metrics(out)}


@pytest.mark.slow
def test_plugin_eval_runs_during_training_beside_the_built_in_keys(trained):
    evals = [m for m in trained["metrics"] if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals if COSINE in m] == [2, 4]
    assert all(-1 <= m[COSINE] <= 1 for m in evals)
    # today's keys (eval.best names them) are unchanged
    assert all("eval/zeroshot/image/val/top1" in m and "eval/retrieval/image-text/val/image_to_text/R@1" in m
               for m in evals)
    assert not any(k.startswith("eval/paircos/") and k != COSINE for m in evals for k in m)  # its metrics only


@pytest.mark.slow
def test_caption_eval_runs_during_training(trained):
    evals = [m for m in trained["metrics"] if BLEU in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0 <= m[BLEU] <= 1 and m[CIDER] >= 0 for m in evals)
    assert not any(k.startswith("eval/caption/") and k not in (BLEU, CIDER) for m in evals for k in m)


@pytest.mark.slow
def test_plugin_eval_runs_from_the_cli_with_its_own_flag(trained):
    """`mmpt --plugin MOD eval paircos --scale 2` on the run: its last eval's value, doubled (same weights)."""
    out = trained["root"] / "paircos.json"
    proc = run([sys.executable, "-m", "mmpt.cli", "--plugin", PLUGIN, "eval", "paircos", "--model", str(trained["run"]),
                "--scale", "2", "--workers", "0", "--out", str(out)], env=trained["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == json.loads(proc.stdout)
    assert result["eval"] == "paircos" and result["num_samples"] == 297
    logged = [m[COSINE] for m in trained["metrics"] if COSINE in m][-1]
    assert result["mean_cosine"] == pytest.approx(2 * logged, rel=1e-5, abs=1e-7)
    assert proc.stderr.strip().splitlines()[-1].startswith("paircos on 297 samples: mean_cosine ")
    unknown = run([sys.executable, "-m", "mmpt.cli", "eval", "paircos", "--model", str(trained["run"])],
                  env=trained["env"])  # without --plugin the eval is not there
    assert unknown.returncode == 2 and "invalid choice: 'paircos'" in unknown.stderr


# ---- in-process: parsing, checks, keys, model card ------------------------------------------------------------

def request(argv: list):
    return eval_request(build_parser().parse_args(argv))


def test_todays_command_lines_give_the_same_items():
    entry, item, options = request(["eval", "zeroshot", "--model", "RUN", "--modality", "audio", "--data", "D",
                                    "--classes", "F", "--templates", "sound", "--out", "X.json", "--png", "X.png"])
    assert entry.name == "zeroshot" and item == ZeroShotEval("audio", "D", "F", "sound") and options == {"png": "X.png"}
    assert request(["eval", "zeroshot", "--run", "RUN"])[1:] == (ZeroShotEval(), {"png": None})
    _, item, options = request(["eval", "retrieval", "--model", "RUN", "--pair", "video-audio", "--data", "D"])
    assert item == RetrievalEval(["video", "audio"], "D") and options == {}
    assert request(["eval", "retrieval", "--model", "RUN"])[1] == RetrievalEval(["image", "text"])
    _, item, _ = request(["eval", "caption", "--model", "RUN", "--data", "D", "--beams", "3", "--max-len", "8"])
    assert item == CaptionEval("image", "D", 3, 8)


def test_bad_flags_are_one_line_usage_errors(capsys):
    for argv, message in ((["--pair", "image"], "--pair 'image': expected two modalities joined by '-'"),
                          (["--beams", "0"], "argument --beams: 0: must be >= 1")):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["eval", "retrieval" if "--pair" in argv else "caption", "--model", "m", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert main(["--plugin", "no_such_mmpt_plugin", "eval", "zeroshot", "--model", "m"]) == 2
    assert "mmpt: error: plugins: cannot import 'no_such_mmpt_plugin'" in capsys.readouterr().err


@dataclass
class Knobs:
    names: list[str]
    alpha: float = 0.5
    size: int | None = None
    loud: bool = False


def fake_run(model, cfg, item, **options):
    return {"score": item.alpha, "nested": {"a": 1, "b": 2}, "num_samples": 3, "skipped": 0, "data": "x/y"}


FAKE = Eval("knobs", Knobs, fake_run, metrics=("score", "nested/a"), label=lambda cfg, item: "-".join(item.names),
            task=("knob-{data}", "knobs on {data}"))


def test_flags_of_an_entry_without_a_cli_hook_come_from_its_config(monkeypatch):
    monkeypatch.setitem(EVALS, "knobs", FAKE)
    entry, item, options = request(["eval", "knobs", "--model", "m", "--names", "a", "b", "--alpha", "2",
                                    "--size", "7", "--loud"])
    assert entry is FAKE and item == Knobs(["a", "b"], 2.0, 7, True) and options == {}
    with pytest.raises(TypeError):  # a field without a default needs its flag
        request(["eval", "knobs", "--model", "m"])


def test_training_keys_due_steps_and_inputs_come_from_the_entries(monkeypatch, tmp_path):
    monkeypatch.setitem(EVALS, "knobs", FAKE)
    cfg = load_config("demo", ["eval.zeroshot=[]", "eval.retrieval=[]", "eval.every=3", "train.steps=10",
                               "eval.knobs=[{names: [p, q]}]"])
    model = torch.nn.Linear(2, 2)
    assert run_evals(model, cfg) == {"eval/knobs/p-q/score": 0.5, "eval/knobs/p-q/nested/a": 1.0}
    assert model.training
    assert [s for s in range(1, 11) if eval_due(cfg, s)] == [3, 6, 9, 10]
    # the training loop asks the same question, so a run with only a plugin or caption eval evaluates too
    assert [s for s in range(1, 11) if loop.eval_due(cfg, s)] == [3, 6, 9, 10]
    cfg.eval.knobs = []
    assert not any(eval_due(cfg, s) for s in range(1, 11))
    cfg.eval.caption = [CaptionEval(data=str(tmp_path / "nope"))]
    with pytest.raises(DataError, match="nope"):  # caption's inputs: its shards, at start
        check_eval_inputs(cfg)


def test_caption_during_training_needs_the_caption_decoder():
    with pytest.raises(ConfigError, match=r"eval\.caption\[0\]\.modality='image': captioning needs the caption "
                                          r"decoder.*model.decoder_cross_layers >= 1"):
        load_config("demo", ["eval.caption=[{modality: image}]", "model.decoder_cross_layers=0"])
    with pytest.raises(ConfigError, match=r"eval\.caption\[0\]\.modality='text': must be a non-text modality"):
        load_config("demo", ["eval.caption=[{modality: text}]"])
    with pytest.raises(ConfigError, match=r"eval\.caption\[0\]\.max_len=99: must be in 2\.\.16"):
        load_config("demo", ["eval.caption=[{max_len: 99}]"])


def test_model_card_rows_of_any_registered_eval(monkeypatch):
    monkeypatch.setitem(EVALS, "knobs", FAKE)
    rows = eval_rows([("results", fake_run(None, None, Knobs(["a"])) | {"eval": "knobs"})])
    assert [(r["task_type"], r["task"], r["metric"], r["value"], r["samples"]) for r in rows] == [
        ("knob-x/y", "knobs on x/y", "score", 0.5, 3), ("knob-x/y", "knobs on x/y", "nested/a", 1.0, 3)]
    # older result files have no "eval" key: the file's name tells, else the metric names
    rows = eval_rows([("zeroshot_audio", {"top1": 0.5, "modality": "audio"})])
    assert rows[0]["task"] == "zero-shot audio classification"
    assert eval_rows([("mine", {"bleu4": 0.1, "modality": "video"})])[0]["task_type"] == "video-to-text"
