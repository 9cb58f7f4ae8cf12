"""Evaluation inside a training run: every `eval.every` steps (and after the last step) every rank runs the
configured zero-shot and retrieval evals on its split of the data, the counts are reduced, and the flat
metrics go to metrics.jsonl and tensorboard. The best value of `eval.best` marks a checkpoint tagged `best`.

    eval: {every: 100, best: eval/zeroshot/image/val/top1,
           zeroshot: [{modality: image}],                      # data.val with data.classes
           retrieval: [{modalities: [image, text], data: data/demo/val}]}

Metric keys: eval/zeroshot/<modality>/<data folder>/top1, eval/retrieval/<pair>/<data folder>/<a>_to_<b>/R@1.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mmpt.modality import pair_name
from mmpt.train.checkpoint import write_durable


def flatten(prefix: str, result: dict) -> dict:
    """Numbers of a (nested) result dict as `prefix/key/...` metrics; lists and strings are left out."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flatten(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


def check_eval_inputs(cfg) -> None:
    """At start, not at the first eval hours later: every eval's data and classes file must be there (DataError
    naming the file)."""
    if not (cfg.eval.every > 0 and (cfg.eval.zeroshot or cfg.eval.retrieval)):
        return
    from mmpt.data.shards import list_shards
    from mmpt.eval.data import data_kind
    from mmpt.eval.zeroshot import load_classes

    for z in cfg.eval.zeroshot:
        load_classes(z.classes or cfg.data.classes, z.modality, z.templates)
    specs = [z.data or cfg.data.val for z in cfg.eval.zeroshot] + [r.data or cfg.data.val for r in cfg.eval.retrieval]
    for data in specs:
        if data_kind(data) == "shards":
            list_shards(data)
        elif not Path(data).exists():
            raise FileNotFoundError(f"eval data {data}: no such file or directory")


def _gathered(model, zero_stage: int):
    """ZeRO-3 partitions parameters; eval calls model.encode outside the engine's forward, so gather them."""
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def run_evals(model, cfg) -> dict:
    """Every configured eval once, on all ranks; returns flat metrics (identical on every rank)."""
    from mmpt.eval.retrieval import run_retrieval
    from mmpt.eval.zeroshot import run_zeroshot

    metrics, was_training = {}, model.training
    model.eval()
    with torch.no_grad(), _gathered(model, cfg.deepspeed.zero_stage):
        for z in cfg.eval.zeroshot:
            result = run_zeroshot(model, cfg, z.modality, data=z.data, classes=z.classes, templates=z.templates)
            keep = {k: v for k, v in result.items() if k.startswith("top")}
            metrics.update(flatten(f"eval/zeroshot/{z.modality}/{Path(z.data or cfg.data.val).name}", keep))
        for r in cfg.eval.retrieval:
            data = r.data or cfg.data.val
            result = run_retrieval(model, cfg, list(r.modalities), data)
            metrics.update(flatten(f"eval/retrieval/{pair_name(*r.modalities)}/{Path(data).name}", result))
    model.train(was_training)
    return metrics


class BestTracker:
    """Remembers the best value of `eval.best` in RUN/best.json (step, metric, value, checkpoint tag)."""

    TAG = "best"

    def __init__(self, out_dir: str | Path, metric: str):
        self.path, self.metric = Path(out_dir) / "best.json", metric
        self.best = json.loads(self.path.read_text()) if self.path.is_file() else None

    def improved(self, metrics: dict) -> bool:
        if not self.metric or self.metric not in metrics:
            return False
        return self.best is None or metrics[self.metric] > self.best["value"]

    def record(self, step: int, metrics: dict, write: bool) -> None:
        self.best = {"step": step, "metric": self.metric, "value": metrics[self.metric], "tag": self.TAG}
        if write:
            write_durable(self.path, json.dumps(self.best, indent=1) + "\n")
