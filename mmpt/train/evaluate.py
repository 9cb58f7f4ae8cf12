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
from tqdm import tqdm

import mmpt.eval  # noqa: F401  (registers the built-in evals)
from mmpt.evals import EVALS
from mmpt.train import checkpoint
from mmpt.train.checkpoint import write_durable
from mmpt.train.runlog import RunLogger


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


def evaluate(engine, model, cfg, step: int, logger: RunLogger, best: BestTracker, rank: int) -> None:
    """Every rank evaluates its split; an improvement of eval.best saves the `best` checkpoint (all ranks)."""
    with torch.random.fork_rng(devices=[]):  # eval loaders draw seeds; training's RNG must not see that
        metrics = run_evals(model, cfg)
    logger.log(step, metrics)
    if rank == 0:
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in headline(metrics).items())
        tqdm.write(f"step {step} eval: {shown}")
    if cfg.eval.best and cfg.eval.best not in metrics and rank == 0:
        tqdm.write(f"eval.best={cfg.eval.best!r} is not among the eval metrics ({', '.join(sorted(metrics))})")
    if best.improved(metrics):
        checkpoint.save_best(engine, cfg.train.out_dir, step, {"step": step, "metric": cfg.eval.best},
                             tag=BestTracker.TAG)
        best.record(step, metrics, write=rank == 0)


def headline(metrics: dict) -> dict:
    """One line's worth: each eval item's top-1 / R@1 where it has them, else its first metric."""
    items: dict = {}
    for key, value in metrics.items():
        items.setdefault(key.rpartition("/")[0], {})[key] = value
    picked = {}
    for group in items.values():
        best = {k: v for k, v in group.items() if k.endswith(("top1", "R@1"))}
        picked.update(best or dict([next(iter(group.items()))]))
    return picked
