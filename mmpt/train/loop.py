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

from mmpt.config import Config, upgrade_old_keys
from mmpt.data.stream import tasks_from_config, train_loader
from mmpt.data.tokenizer import check_model_fits
from mmpt.distributed import (
    abort_distributed,
    collective_device,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from mmpt.errors import ConfigError, DataError
from mmpt.losses.contrastive import rank_groups
from mmpt.model import build_for_run
from mmpt.train import checkpoint, faults, hub_push, hub_resume, preempt, reshard, throughput
from mmpt.train.accelerate_plugin import warn_accelerate_disagreements
from mmpt.train.accumulate import accumulated_step
from mmpt.train.engine import TrainModule, build_engine, clear_grad_partitions, half_dtype, to_engine
from mmpt.train.evaluate import BestTracker, check_eval_inputs, eval_due, evaluate
from mmpt.train.resume import check_same_run, choose_tag, seed_rank
from mmpt.train.runlog import RunLogger


class BadDataError(DataError):
    """Too many bad samples (data.bad_sample_limit): a data problem the user fixes, so one line, exit 2."""


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
    size = size if 0 < size < world else world
    if world % size:
        raise ConfigError(f"loss.contrastive_group_size={cfg.loss.contrastive_group_size}: groups of {size} ranks do "
                          f"not divide the world size {world}")
    return size


def contrastive_summary(cfg: Config, world: int) -> str:
    """One line on what the contrastive loss sees: each task's negatives per positive, from its own batch size
    (data.tasks.<pair>.batch_size), GBA-ITC groups and GradCache accumulation. Tasks of equal batch share a part."""
    loss, k = cfg.loss, cfg.train.accumulate
    group = contrastive_group_size(cfg, world)
    how = "ring" if loss.contrastive_ring else "gathered" + (f", chunks of {loss.contrastive_chunk}"
                                                             if loss.contrastive_chunk else "")
    tasks, _ = tasks_from_config(cfg, expand=False)
    by_rows: dict = {}
    for name, task in tasks.items():
        if len(task.modalities) > 1:  # a one-modality task has no contrastive pair
            by_rows.setdefault(task.batch_size * k, []).append(name)
    parts = [f"{', '.join(names)}: {rows} rows a rank, {group * rows - 1} negatives per positive"
             for rows, names in by_rows.items()]
    micro = "1 micro-batch" if k == 1 else f"{k} micro-batches"
    line = (f"contrastive: {loss.contrastive_kind}, {how}, over {group} of {world} ranks, {micro} a step; "
            + ("; ".join(parts) or "no task has a modality pair"))
    if group < world and by_rows:
        wide = ", ".join(f"{world * rows - 1} for {', '.join(names)}" for rows, names in by_rows.items())
        line += f" (GBA-ITC groups; the global batch would give {wide})"
    return line


def train(cfg: Config) -> dict:
    # User mistakes fail here, one line each, before any process group or engine exists.
    tasks_from_config(cfg)  # a shard pattern matching nothing
    check_eval_inputs(cfg)  # eval data and classes, not first found at the first eval
    check_resumable(cfg)
    rank, world = init_distributed()
    warn_accelerate_disagreements(cfg, rank)
    try:
        if hub_resume.fetch(cfg, int(os.environ.get("LOCAL_RANK", rank)), print if rank == 0 else lambda m: None):
            check_resumable(cfg)  # the downloaded config must describe this run too
        # Listening from the start: a stop signal during start-up (engine build, resume) stops the run at its
        # first step boundary instead of killing it.
        with preempt.Preemption() as signals:
            result = _train(cfg, rank, world, signals)
    except BaseException:
        # No barrier: the other ranks may sit in a collective this rank will never join; exiting closes this
        # rank's connections, which ends theirs with an error (and torchrun stops the group).
        abort_distributed()
        raise
    shutdown_distributed()
    return result


def check_resumable(cfg: Config) -> None:
    """Before anything starts: a run directory with a checkpoint must hold the same model and tasks."""
    out_dir = Path(cfg.train.out_dir)
    saved = out_dir / "config.yaml"
    if cfg.train.resume and saved.is_file() and choose_tag(checkpoint.checkpoint_dir(out_dir), lambda m: None):
        check_same_run(upgrade_old_keys(yaml.safe_load(saved.read_text()) or {}), cfg.to_dict(), out_dir)


def _start(cfg: Config, rank: int, world: int):
    """Model, engine and the resumed state; config.yaml is (re)written only after the checkpoint has loaded."""
    out_dir = Path(cfg.train.out_dir)
    check_model_fits(cfg.data.tokenizer, cfg.model)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_for_run(cfg)
    size = contrastive_group_size(cfg, world)
    group = rank_groups(size) if size < world else None
    say = (lambda m: tqdm.write(m)) if rank == 0 else (lambda m: None)
    tag, before = checkpoint.find(out_dir, say) if cfg.train.resume else (None, None)
    before = before or world
    universal = tag is not None and reshard.needs_universal(cfg, before, world)
    engine = build_engine(TrainModule(model, cfg.loss, group), cfg, world, load_universal=universal)
    seed_rank(cfg.train.seed, rank)  # dropout and DropToken masks differ across ranks
    state = checkpoint.resume(engine, out_dir, tag, before, universal, cfg.deepspeed.zero_stage) if tag else {}
    if rank == 0:
        write_run_config(cfg, out_dir)
        print(contrastive_summary(cfg, world), flush=True)
    loader = train_loader(cfg, cfg.train.seed)
    _resume_data(loader, state, cfg, world, say)
    loader.start()  # every task's workers forked at one quiet point, before tqdm's and tensorboard's threads
    return model, engine, group, state, loader


def _resume_data(loader, state: dict, cfg: Config, world: int, say) -> None:
    """Exactly where it stopped when the run is the same shape; else the task sequence continues at the step
    with fresh sample streams keyed by that step (see README: resuming on another number of ranks)."""
    if not state:
        return
    step, mine = int(state.get("step", 0)), state.get("rank_state")
    if cfg.train.resume == "weights":
        say(f"train.resume=weights: weights, optimizer and step {step} from {state['tag']}; fresh data streams")
    elif mine is None or not loader.exact(mine):
        say(f"resuming {state['tag']} (saved on {state['world']} ranks) on {world} ranks with "
            f"data.num_workers={cfg.data.num_workers}: the data streams restart at step {step} (not exact)")
    else:
        loader.load_state_dict(mine)
        return
    loader.restart_at(step)


def _train(cfg: Config, rank: int, world: int, signals: preempt.Preemption) -> dict:
    out_dir = Path(cfg.train.out_dir)
    model, engine, group, state, loader = _start(cfg, rank, world)
    start = int(state.get("step", 0))
    skipped = {k: Counter(v) for k, v in state.get("skipped", {"reasons": {}, "shards": {}}).items()}
    used = int(state.get("samples", 0))
    logger = RunLogger(out_dir, enabled=rank == 0, start_step=start)
    best = BestTracker(out_dir, cfg.eval.best)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    pending = {"reasons": Counter(), "shards": Counter()}
    step, last, stopped = start, {}, False
    pusher = hub_push.Pusher(cfg, tqdm.write) if rank == 0 and cfg.train.hub.repo else None
    if rank == 0:
        preempt.clear(out_dir)
    if state and state["world"] != world:  # save in this world size's layout now: a crash won't convert again
        _save(engine, cfg, start, skipped, used, loader, pusher)
    window = throughput.open_window(cfg, world, engine.device, half_dtype(engine) or torch.float32,
                                    say=tqdm.write if rank == 0 else None)  # the first window starts here
    try:  # the bar ends its line and the metrics reach disk when a step fails, too
        while step < cfg.train.steps and not stopped:
            waited = time.perf_counter()
            task, batches = loader.take(cfg.train.accumulate)
            window["wait"] += time.perf_counter() - waited
            for batch in batches:
                for kind, counts in batch.pop("_skipped").items():
                    pending[kind].update(counts)
            terms = loader.loaders[task].task
            losses = train_step(engine, terms.modalities, batches, cfg, group, terms.loss_weight, terms.drop_token)
            step += 1
            faults.maybe("step", step, rank)
            n = sum(batch["label"].size(0) for batch in batches) * world
            window["n"] += n
            _accumulate(window["sums"], task, losses)
            window["flops"] += window["counter"](batches, terms.modalities, terms.drop_token)
            used += n
            bar.update(1)
            stopped = signals.stop_now()
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or stopped:
                for kind, counts in _gather_counts(pending).items():
                    skipped[kind].update(counts)
                    pending[kind].clear()
                last = _log_step(engine, losses, step, window, logger, bar, task=task,
                                 skipped=sum(skipped["reasons"].values()))
                check_bad_fraction(skipped, used, cfg.data.bad_sample_limit)
            if eval_due(cfg, step):
                evaluate(engine, model, cfg, step, logger, best, rank)
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stopped:
                logger.flush()
                _save(engine, cfg, step, skipped, used, loader, pusher)
    finally:
        bar.close()
        logger.close()
    summary = {"steps": step, "samples": used, "skipped": dict(skipped["reasons"]), **last}
    if rank == 0:
        _report_end(out_dir, step, used, skipped, stopped)
    pushed = pusher.finish(60.0 if stopped else cfg.train.hub.final_wait_s) if pusher else True
    return {**summary, "preempted": stopped, "hub_ok": pushed}


def _save(engine, cfg: Config, step: int, skipped: dict, used: int, loader, pusher=None) -> None:
    checkpoint.save(engine, cfg.train.out_dir, step, {"skipped": {k: dict(v) for k, v in skipped.items()},
                                                      "samples": used}, cfg.train.keep_checkpoints, loader.state_dict())
    if pusher is not None:  # rank 0, once the tag and `latest` are on disk
        pusher.offer(step, checkpoint.TAG.format(step), final=step >= cfg.train.steps)


def train_step(engine, modalities: list, batches: list, cfg: Config, group=None, weight: float = 1.0,
               drop_token: dict | None = None) -> dict:
    """One optimizer step of one task: its batches (k > 1: accumulated, GradCache) -> forward, losses, backward
    (the task's loss scaled by `weight`), clipping and the optimizer, as DeepSpeed runs them."""
    inputs = [to_engine({m: batch[m] for m in modalities}, engine) for batch in batches]
    if len(inputs) > 1:
        return accumulated_step(engine, inputs, cfg.loss, group, weight, drop_token)
    losses = engine(inputs[0], drop_token=drop_token)
    engine.backward(losses["loss"] * weight if weight != 1.0 else losses["loss"])
    engine.step()
    clear_grad_partitions(engine)
    return losses


def _report_end(out_dir: Path, step: int, used: int, skipped: dict, stopped: bool) -> None:
    if stopped:
        preempt.mark(out_dir, step)
        print(f"preempted: checkpoint of step {step} saved in {checkpoint.checkpoint_dir(out_dir)}; "
              f"{out_dir / preempt.MARKER} written; the same command resumes", flush=True)
        return
    reasons = f" {dict(skipped['reasons'])}" if skipped["reasons"] else ""
    print(f"done: {step} steps, {used} samples, skipped {sum(skipped['reasons'].values())} bad samples{reasons}; "
          f"checkpoints in {checkpoint.checkpoint_dir(out_dir)}", flush=True)


def _accumulate(sums: dict, task: str, losses: dict) -> None:
    """Add a step's scalar losses to its task's running sums, on the device (no host sync per step)."""
    count = sums.setdefault((task, "steps"), [0])
    count[0] += 1
    for key, value in losses.items():
        if torch.is_tensor(value) and value.numel() == 1:
            total = sums.get((task, key))
            sums[(task, key)] = value.detach().float() if total is None else total + value.detach().float()


def _task_means(sums: dict) -> dict:
    """Every task's mean losses since the last log step, keyed "<task>/<loss>", and "<task>/steps". Every rank
    ran the same tasks, so the keys agree and one all_reduce averages them over ranks."""
    steps = {task: box[0] for (task, key), box in sums.items() if key == "steps"}
    values = {f"{task}/{key}": (v / steps[task]).item() for (task, key), v in sums.items() if key != "steps"}
    means = _reduce_mean(values) if values else {}
    sums.clear()
    return {**means, **{f"{task}/steps": n for task, n in steps.items()}}


def _log_step(engine, losses: dict, step: int, window: dict, logger: RunLogger, bar, **extra) -> dict:
    # This step's losses (its task's, the same on every rank) and every task's means since the last log step.
    now = time.time()
    seconds = max(now - window["t"], 1e-9)
    flops = _reduce_mean({"flops": window["flops"]})["flops"] * window["world"]  # ranks' text lengths differ
    rates = throughput.window_throughput(window["sums"], seconds, window["world"], flops, window["peak"],
                                         window["probe"])
    rates["loader_wait_share"] = window["wait"] / seconds  # this rank's time waiting for batches
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rates["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    metrics = {**_reduce_mean({k: v.item() for k, v in losses.items()}), **_task_means(window["sums"]), **rates,
               **extra}
    metrics["samples_per_s"] = window["n"] / seconds
    metrics["lr"] = engine.get_lr()[0]
    window.update(t=now, n=0, wait=0.0, flops=0.0)
    logger.log(step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
    return metrics
