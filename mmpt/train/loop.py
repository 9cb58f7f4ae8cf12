"""The training loop: stream -> DeepSpeed engine step -> log -> checkpoint, resumable.

    torchrun --nproc_per_node=2 -m mmpt.cli train --config demo train.steps=400
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from mmpt.config import Config
from mmpt.data.stream import tasks_from_config, train_loader
from mmpt.data.tokenizer import check_model_fits
from mmpt.distributed import collective_device, gather_objects, init_distributed, shutdown_distributed
from mmpt.losses.contrastive import rank_groups
from mmpt.model import build_for_run
from mmpt.train import checkpoint
from mmpt.train.accumulate import accumulated_step
from mmpt.train.engine import TrainModule, build_engine, to_engine
from mmpt.train.evaluate import BestTracker, run_evals
from mmpt.train.runlog import RunLogger


class BadDataError(RuntimeError):
    pass


def _reduce_mean(values: dict) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def _gather_counts(counts: dict) -> dict:
    """Sum {"reasons": Counter, "shards": Counter} over ranks (small dicts, so all_gather_object is fine)."""
    total = {"reasons": Counter(), "shards": Counter()}
    for part in gather_objects(counts):
        for kind in total:
            total[kind].update(part[kind])
    return total


def check_bad_fraction(skipped: dict, used: int, limit: float) -> None:
    bad = sum(skipped["reasons"].values())
    if bad and bad / (bad + used) > limit:
        reasons = ", ".join(f"{r}={n}" for r, n in skipped["reasons"].most_common())
        worst = ", ".join(f"{u} ({n})" for u, n in skipped["shards"].most_common(5))
        raise BadDataError(f"{bad} of {bad + used} samples were bad ({reasons}), over data.bad_sample_limit={limit}; "
                           f"worst shards: {worst}")


def write_run_config(cfg: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def contrastive_group_size(cfg: Config, world: int) -> int:
    """Ranks per contrastive group: loss.contrastive_group_size, -1 meaning one node (torchrun's
    LOCAL_WORLD_SIZE), 0 or >= world meaning every rank."""
    size = cfg.loss.contrastive_group_size
    if size == -1:
        size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return size if 0 < size < world else world


def contrastive_summary(cfg: Config, world: int) -> str:
    """One line on what the contrastive loss sees, negatives per positive included (GBA-ITC groups and
    GradCache accumulation change them)."""
    loss, rows = cfg.loss, cfg.data.batch_size * cfg.train.accumulate
    group = contrastive_group_size(cfg, world)
    how = "ring" if loss.contrastive_ring else "gathered" + (f", chunks of {loss.contrastive_chunk}"
                                                             if loss.contrastive_chunk else "")
    line = (f"contrastive: {loss.contrastive_kind}, {how}, over {group} of {world} ranks x {rows} rows "
            f"({cfg.train.accumulate} micro-batches): {group * rows - 1} negatives per positive")
    if group < world:
        line += f" (GBA-ITC groups; the global batch would give {world * rows - 1})"
    return line


def train(cfg: Config) -> dict:
    rank, world = init_distributed()
    try:
        return _train(cfg, rank, world)
    finally:
        shutdown_distributed()


def _train(cfg: Config, rank: int, world: int) -> dict:
    out_dir = Path(cfg.train.out_dir)
    tasks_from_config(cfg)  # a shard spec matching nothing fails here, before the engine is built
    check_model_fits(cfg.data.tokenizer, cfg.model)
    if rank == 0:
        write_run_config(cfg, out_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_for_run(cfg)
    size = contrastive_group_size(cfg, world)
    group = rank_groups(size) if size < world else None
    engine = build_engine(TrainModule(model, cfg.loss, group), cfg, world)
    if rank == 0:
        print(contrastive_summary(cfg, world), flush=True)
    state = checkpoint.resume(engine, out_dir) if cfg.train.resume else {}
    start = int(state.get("step", 0))
    skipped = {k: Counter(v) for k, v in state.get("skipped", {"reasons": {}, "shards": {}}).items()}
    used = int(state.get("samples", 0))
    loader = train_loader(cfg, cfg.train.seed)
    if "data" in state:
        loader.load_state_dict(state["data"][rank])
    logger = RunLogger(out_dir, enabled=rank == 0)
    best = BestTracker(out_dir, cfg.eval.best)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    pending, window = {"reasons": Counter(), "shards": Counter()}, {"t": time.time(), "n": 0}
    step, last = start, {}
    while step < cfg.train.steps:
        task, batches = loader.take(cfg.train.accumulate)
        for batch in batches:
            for kind, counts in batch.pop("_skipped").items():
                pending[kind].update(counts)
        modalities = loader.loaders[task].task.modalities
        inputs = [to_engine({m: batch[m] for m in modalities}, engine) for batch in batches]
        if len(inputs) > 1:
            losses = accumulated_step(engine, inputs, cfg.loss, group)
        else:
            losses = engine(inputs[0])
            engine.backward(losses["loss"])
            engine.step()
        step += 1
        n = sum(batch["label"].size(0) for batch in batches) * world
        window["n"] += n
        used += n
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            for kind, counts in _gather_counts(pending).items():
                skipped[kind].update(counts)
                pending[kind].clear()
            last = _log_step(engine, losses, step, window, logger, bar, task=task,
                             skipped=sum(skipped["reasons"].values()))
            check_bad_fraction(skipped, used, cfg.data.bad_sample_limit)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            data_states = [None] * world
            dist.all_gather_object(data_states, loader.state_dict())
            checkpoint.save(engine, out_dir, step, {"skipped": {k: dict(v) for k, v in skipped.items()},
                                                    "samples": used, "data": data_states}, cfg.train.keep_checkpoints)
        if _eval_due(cfg, step):
            _evaluate(engine, model, cfg, step, logger, best, rank)
    bar.close()
    logger.close()
    summary = {"steps": step, "samples": used, "skipped": dict(skipped["reasons"]), **last}
    if rank == 0:
        reasons = f" {dict(skipped['reasons'])}" if skipped["reasons"] else ""
        print(f"done: {step} steps, {used} samples, skipped {sum(skipped['reasons'].values())} bad samples{reasons}; "
              f"checkpoints in {checkpoint.checkpoint_dir(out_dir)}", flush=True)
    return summary


def _eval_due(cfg: Config, step: int) -> bool:
    configured = cfg.eval.every > 0 and (cfg.eval.zeroshot or cfg.eval.retrieval)
    return bool(configured) and (step % cfg.eval.every == 0 or step == cfg.train.steps)


def _evaluate(engine, model, cfg: Config, step: int, logger: RunLogger, best: BestTracker, rank: int) -> None:
    """Every rank evaluates its split; an improvement of eval.best saves the `best` checkpoint (all ranks)."""
    metrics = run_evals(model, cfg)
    logger.log(step, metrics)
    if rank == 0:
        headline = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.endswith(("top1", "R@1"))}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in headline.items())
        tqdm.write(f"step {step} eval: {shown}")
    if cfg.eval.best and cfg.eval.best not in metrics and rank == 0:
        tqdm.write(f"eval.best={cfg.eval.best!r} is not among the eval metrics ({', '.join(sorted(metrics))})")
    if best.improved(metrics):
        engine.save_checkpoint(str(checkpoint.checkpoint_dir(cfg.train.out_dir)), tag=BestTracker.TAG,
                               client_state={"step": step, "metric": cfg.eval.best}, save_latest=False)
        best.record(step, metrics, write=rank == 0)


def _log_step(engine, losses: dict, step: int, window: dict, logger: RunLogger, bar, **extra) -> dict:
    # Loss names depend on the task, so only this step's task is reduced (every rank ran the same task).
    metrics = {**_reduce_mean({k: v.item() for k, v in losses.items()}), **extra}
    now = time.time()
    metrics["samples_per_s"] = window["n"] / max(now - window["t"], 1e-9)
    metrics["lr"] = engine.get_lr()[0]
    window.update(t=now, n=0)
    logger.log(step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
    return metrics
