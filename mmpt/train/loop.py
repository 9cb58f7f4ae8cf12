"""The training loop: stream -> DeepSpeed engine step -> log -> checkpoint, resumable.

    torchrun --nproc_per_node=2 -m mmpt.cli train --config demo train.steps=400
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from mmpt.config import Config
from mmpt.data.decode import SKIP_REASONS
from mmpt.data.shards import list_shards
from mmpt.data.stream import make_loader
from mmpt.model import build_model
from mmpt.train import checkpoint
from mmpt.train.engine import TrainModule, build_engine, init_distributed, shutdown_distributed
from mmpt.train.logging import RunLogger

TENSOR_KEYS = ("image", "text")


class BadDataError(RuntimeError):
    pass


def _reduce_mean(values: dict) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def _reduce_counts(counts: Counter, reasons: list) -> Counter:
    t = torch.tensor([counts.get(r, 0) for r in reasons], dtype=torch.float64)
    dist.all_reduce(t)
    return Counter({r: int(v) for r, v in zip(reasons, t.tolist()) if v})


def check_bad_fraction(skipped: Counter, used: int, limit: float) -> None:
    bad = sum(skipped.values())
    if bad and bad / (bad + used) > limit:
        detail = ", ".join(f"{r}={n}" for r, n in skipped.most_common())
        raise BadDataError(f"{bad} of {bad + used} samples were bad ({detail}), over data.bad_sample_limit={limit}")


def write_run_config(cfg: Config, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(cfg: Config) -> dict:
    rank, world = init_distributed()
    try:
        return _train(cfg, rank, world)
    finally:
        shutdown_distributed()


def _train(cfg: Config, rank: int, world: int) -> dict:
    out_dir = Path(cfg.train.out_dir)
    list_shards(cfg.data.train)  # a spec matching nothing fails here, before the engine is built
    if rank == 0:
        write_run_config(cfg, out_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.loss.init_temperature, cfg.loss.max_logit_scale)
    engine = build_engine(TrainModule(model, cfg.loss), cfg, world)
    state = checkpoint.resume(engine, out_dir) if cfg.train.resume else {}
    start = int(state.get("step", 0))
    skipped_total = Counter(state.get("skipped", {}))
    used_total = int(state.get("samples", 0))
    # Reseed the resampled stream on resume so the restarted run does not replay the first batches.
    loader = make_loader(cfg.data.train, image_size=cfg.model.image_size, context_length=cfg.model.context_length,
                         batch_size=cfg.data.batch_size, train=True, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed * 100_003 + start, shuffle_buffer=cfg.data.shuffle_buffer)
    logger = RunLogger(out_dir, enabled=rank == 0)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    skipped_local, window = Counter(), {"t": time.time(), "n": 0}
    step, last = start, {}
    batches = iter(loader)
    while step < cfg.train.steps:
        batch = next(batches)
        skipped_local.update(batch.pop("_skipped"))
        losses = engine({k: batch[k] for k in TENSOR_KEYS})
        engine.backward(losses["loss"])
        engine.step()
        step += 1
        window["n"] += batch["image"].size(0) * world
        used_total += batch["image"].size(0) * world
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            skipped_total += _reduce_counts(skipped_local, SKIP_REASONS)
            skipped_local.clear()
            last = _log_step(engine, losses, step, window, logger, bar, skipped=sum(skipped_total.values()))
            check_bad_fraction(skipped_total, used_total, cfg.data.bad_sample_limit)
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
            checkpoint.save(engine, out_dir, step, {"skipped": dict(skipped_total), "samples": used_total},
                            cfg.train.keep_checkpoints)
    bar.close()
    logger.close()
    summary = {"steps": step, "samples": used_total, "skipped": dict(skipped_total), **last}
    if rank == 0:
        reasons = f" {dict(skipped_total)}" if skipped_total else ""
        print(f"done: {step} steps, {used_total} samples, skipped {sum(skipped_total.values())} bad samples{reasons}; "
              f"checkpoints in {checkpoint.checkpoint_dir(out_dir)}", flush=True)
    return summary


def _log_step(engine, losses: dict, step: int, window: dict, logger: RunLogger, bar, **extra) -> dict:
    metrics = {**_reduce_mean({k: v.item() for k, v in losses.items()}), **extra}
    now = time.time()
    metrics["samples_per_s"] = window["n"] / max(now - window["t"], 1e-9)
    metrics["lr"] = engine.get_lr()[0]
    window.update(t=now, n=0)
    logger.log(step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
    return metrics
