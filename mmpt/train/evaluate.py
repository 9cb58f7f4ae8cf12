"""Evaluation inside a training run: every `eval.every` steps (and after the last step) every rank runs every
configured eval of the registry (mmpt.evals: zero-shot, retrieval, caption, plugins' evals) on its split of the
data, and the flat metrics go to metrics.jsonl and tensorboard. The best value of `eval.best` marks a checkpoint
tagged `best`.

    eval: {every: 100, best: eval/zeroshot/image/val/top1,
           zeroshot: [{modality: image}],                      # data.val with data.classes
           retrieval: [{modalities: [image, text], data: data/demo/val}],
           caption: [{modality: image}]}

Metric keys: eval/<name>/<label>/<metric>, the label and the metrics chosen by the eval's entry:
eval/zeroshot/<modality>/<data folder>/top1, eval/retrieval/<pair>/<data folder>/<a>_to_<b>/R@1,
eval/caption/<modality>/<data folder>/cider.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

import mmpt.eval  # noqa: F401  (registers the built-in evals)
from mmpt.evals import EVALS
from mmpt.train.checkpoint import write_durable


def configured(cfg) -> list:
    """(entry, item) of every eval the config lists, in registry order."""
    return [(entry, item) for name, entry in EVALS.items() for item in getattr(cfg.eval, name, None) or []]


def eval_due(cfg, step: int) -> bool:
    """Evals run at every eval.every-th step and after the last step, when any is configured."""
    if cfg.eval.every <= 0 or not configured(cfg):
        return False
    return step % cfg.eval.every == 0 or step == cfg.train.steps


def check_eval_inputs(cfg) -> None:
    """At start, not at the first eval hours later: every eval's inputs must be there (each entry's `inputs`
    raises naming the missing file)."""
    if cfg.eval.every <= 0:
        return
    for entry, item in configured(cfg):
        entry.inputs(cfg, item)


def _gathered(model, zero_stage: int):
    """ZeRO-3 partitions parameters; eval calls model.encode outside the engine's forward, so gather them."""
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed  # deferred: only ZeRO-3 runs need it here

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def run_evals(model, cfg) -> dict:
    """Every configured eval once, on all ranks; returns flat metrics (identical on every rank)."""
    metrics, was_training = {}, model.training
    model.eval()
    try:
        with torch.no_grad(), _gathered(model, cfg.deepspeed.zero_stage):
            for entry, item in configured(cfg):
                prefix = entry.key(cfg, item)
                metrics.update({f"{prefix}/{k}": v for k, v in entry.values(entry.run(model, cfg, item)).items()})
    finally:
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
