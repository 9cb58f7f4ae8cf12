"""Streams from shards to batch dicts keyed by modality.

Training: one `TaskLoader` per task (a modality pair fed by one or more weighted sources), each a DataLoader
over `TaskStream` (see `mmpt.data.resumable`: resampled per rank and worker, exactly resumable).
`MultiTaskLoader` picks the task of each step from a seeded RNG, so every rank runs the same task.
Evaluation: `eval_loader`, a finite webdataset pipeline split by node and worker (each sample once).

Each training batch carries `_skipped` ({"reasons": {...}, "shards": {...}}) since the previous batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmpt.config import source_augment, task_view
from mmpt.data.decode import SampleDecoder
from mmpt.data.media import DecodeSettings
from mmpt.data.resumable import Grouping, SkipCounter, Source, WorkerStream, batches, collate, rng_for
from mmpt.data.samples import BadSample
from mmpt.data.shards import list_shards
from mmpt.distributed import dist_info, shield_from_stop_signals
from mmpt.errors import DataError
from mmpt.modality import MODALITIES, ordered, pair_name

log = logging.getLogger("mmpt.data")


def warn_few_shards(n_shards: int, name: str, num_workers: int) -> None:
    rank, world = dist_info()
    readers = world * max(1, num_workers)
    if n_shards < readers and rank == 0:
        log.warning("%s: %d shard(s) for %d readers (ranks x workers): readers will share shards and batches will "
                    "correlate (finite mode: some readers get none). Fix: rebuild with a smaller --shard-size so there "
                    "are at least %d shards, or lower data.num_workers.", name, n_shards, readers, readers)


@dataclass
class TaskConfig:
    name: str
    modalities: list
    sources: list  # [Source]
    batch_size: int
    loss_weight: float = 1.0
    drop_token: dict | None = None  # modality -> DropToken rate for this task; None: the model's
    settings: DecodeSettings | None = None  # this task's sizes (data.tasks); None: the run's
    start_step: int = 0  # the step it joins the mix (data.tasks.<pair>.start_step)
    grouping: Grouping | None = None  # batches of groups sharing a json field (data.tasks.<pair>.group_by)


class TaskStream(IterableDataset):
    def __init__(self, task: TaskConfig, settings: DecodeSettings, seed: int, slots: int, buffer: int,
                 max_bad: int = 1000):
        self.task, self.settings, self.seed, self.slots, self.buffer = task, settings, seed, slots, buffer
        self.max_bad = max_bad
        self.resume_states: dict = {}
        self.worker_offset = 0
        self.restart = 0  # the step a re-derived stream started at (see TaskLoader.restart_at); 0: the original

    def __iter__(self):
        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        worker = (physical + self.worker_offset) % n_workers  # logical id: see TaskLoader.load_state_dict
        rank, _ = dist_info()
        counter = SkipCounter(log)
        # Keyed by the task: two tasks reading the same shards (video-text, video-audio) draw different
        # sample orders and augmentations.
        seed = f"{self.seed}:task:{self.task.name}"
        seed = seed if not self.restart else f"{seed}:restart:{self.restart}"
        stream = WorkerStream(self.task.sources, seed, rank, worker, self.slots, self.buffer, counter,
                              self.resume_states.get(worker), self.task.grouping)
        decoders = [SampleDecoder(s.modalities, self.source_settings(s), train=True) for s in self.task.sources]
        return batches(stream, decoders, self.task.batch_size, self.task.modalities, counter, worker, self.max_bad)

    def source_settings(self, source: Source) -> DecodeSettings:
        """The decode settings of one source: the task's, with the source's own augmentation if it has one."""
        settings = self.task.settings or self.settings
        return settings if source.augment is None else settings.replace(augment=source.augment)


class TaskLoader:
    """An infinite DataLoader for one task with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, task: TaskConfig, settings: DecodeSettings, seed: int, num_workers: int = 1, slots: int = 4,
                 buffer: int = 256, pin_memory: bool = False, prefetch: int = 2, max_bad: int = 1000,
                 timeout: float = 0.0):
        self.task, self.num_workers, self.timeout = task, num_workers, timeout if num_workers > 0 else 0.0
        self.dataset = TaskStream(task, settings, seed, slots, buffer, max_bad)
        # Our own generator for DataLoader's base seed: drawn from the global one, it would shift the model's
        # RNG (dropout, DropToken) by when each task's loader starts, which differs after a resume.
        self.kw = dict(batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                       persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers > 0 else None,
                       generator=torch.Generator().manual_seed(0), timeout=self.timeout,
                       worker_init_fn=shield_from_stop_signals)
        self.consumed, self.states, self._it = 0, {}, None
        warn_few_shards(sum(len(s.urls) for s in task.sources), task.name, num_workers)

    def start(self) -> None:
        """Start the worker processes (forked now, not whenever the task first comes up mid-training)."""
        if self._it is None:
            self._it = iter(DataLoader(self.dataset, **self.kw))

    def __next__(self) -> dict:
        self.start()
        try:
            batch = next(self._it)
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise DataError(f"task '{self.task.name}': no batch from its loader worker in {self.timeout:.0f} s "
                            "(data.worker_timeout): a hung decoder or storage, or a deadlocked worker") from None
        if "_error" in batch:
            raise DataError(f"task '{self.task.name}': {batch['_error']}")
        self.states[batch.pop("_worker")] = batch.pop("_state")
        self.consumed += 1
        return batch

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "num_workers": max(1, self.num_workers), "workers": dict(self.states),
                "rank_world": list(dist_info()), "restart": self.dataset.restart}

    def exact(self, state: dict) -> bool:
        """Whether `state` can be resumed exactly here (same rank, world size and worker count)."""
        return state["num_workers"] == max(1, self.num_workers) and list(state["rank_world"]) == list(dist_info())

    def restart_at(self, step: int) -> None:
        """A fresh stream keyed by the step it starts at: no sample order of the earlier streams repeats."""
        self.consumed, self.states, self._it = 0, {}, None
        self.dataset.resume_states, self.dataset.worker_offset, self.dataset.restart = {}, 0, step

    def load_state_dict(self, state: dict) -> None:
        if not self.exact(state):
            raise DataError(f"task '{self.task.name}': data state saved with {state['num_workers']} workers at "
                             f"(rank, world)={state['rank_world']}; cannot resume exactly with {self.num_workers} "
                             f"workers at {list(dist_info())}")
        self.dataset.restart = state.get("restart", 0)
        self.consumed = state["consumed"]
        self.states = {int(k): v for k, v in state["workers"].items()}
        self.dataset.resume_states = self.states
        # DataLoader always starts at worker 0; shift logical ids so batch order continues round-robin.
        self.dataset.worker_offset = self.consumed % max(1, self.num_workers)
        self._it = None


class MultiTaskLoader:
    """Alternating tasks: step k runs the task drawn from rng(seed, k) by weight among the tasks started by k
    (`starts`: name -> first step, default 0), identical on every rank."""

    def __init__(self, loaders: dict, weights: dict, seed: int, starts: dict | None = None):
        self.loaders, self.weights, self.seed, self.step = loaders, weights, seed, 0
        self.names, self.starts = sorted(loaders), starts or {}

    def __next__(self) -> tuple[str, dict]:
        name, batches = self.take(1)
        return name, batches[0]

    def take(self, k: int) -> tuple[str, list]:
        """The next step's task and k batches of it (an accumulated step is one task)."""
        names = [n for n in self.names if self.starts.get(n, 0) <= self.step]
        name = rng_for(self.seed, "task", self.step).choices(names, [self.weights[n] for n in names])[0]
        self.step += 1
        return name, [next(self.loaders[name]) for _ in range(k)]

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"step": self.step, "tasks": {n: loader.state_dict() for n, loader in self.loaders.items()}}

    def start(self) -> None:
        for loader in self.loaders.values():
            loader.start()

    def restart_at(self, step: int) -> None:
        """Continue the task sequence at `step` with fresh sample streams (another world size or worker count,
        or train.resume=weights)."""
        self.step = step
        for loader in self.loaders.values():
            loader.restart_at(step)

    def exact(self, state: dict) -> bool:
        return all(self.loaders[n].exact(s) for n, s in state["tasks"].items() if n in self.loaders)

    def load_state_dict(self, state: dict) -> None:
        if set(state["tasks"]) != set(self.loaders):
            raise DataError(f"checkpoint's tasks {sorted(state['tasks'])} differ from this config's "
                            f"{sorted(self.loaders)} (data.sources changed, or a run from before mmpt's one pair "
                            "spelling): resume with the same sources, or set train.resume=false")
        self.step = state["step"]
        for name, sub in state["tasks"].items():
            self.loaders[name].load_state_dict(sub)


def eval_loader(shards: str, modalities: list, settings: DecodeSettings, batch_size: int, num_workers: int = 0):
    """Finite, every sample once across ranks and workers, in shard order; partial last batch kept. Bad samples
    take batch slots and are counted in `_skipped`, so a batch may hold none (`__key__` empty: skip it)."""
    urls = list_shards(shards)
    warn_few_shards(len(urls), shards, num_workers)
    counter = SkipCounter(log)
    decoder = SampleDecoder(modalities, settings, train=False)

    def decode(sample):
        try:
            return decoder(sample)
        except BadSample as e:
            counter.record(e.reason, sample.get("__url__", "?"), sample.get("__key__", "?"), str(e))
            return {"_bad": e.reason}  # a marker, not a drop: a batch after the last good sample still counts it

    def batch_fn(samples):
        good = [s for s in samples if "_bad" not in s]
        batch = collate(good, modalities) if good else {"label": torch.zeros(0, dtype=torch.long), "__key__": []}
        return {**batch, "_skipped": counter.take()}

    def on_tar_error(exn):
        return counter.tar_handler(exn.args[-1] if exn.args else "?")(exn)

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                                wds.tarfile_to_samples(handler=on_tar_error), wds.map(decode),
                                wds.batched(batch_size, collation_fn=batch_fn, partial=True))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, worker_init_fn=shield_from_stop_signals)


def make_sources(cfg, expand: bool = True) -> list:
    """data.sources -> Source objects with expanded, checked shard lists (errors name the pattern) and each
    source's resolved augmentation; files an augmentation names (audio noise) are listed now (errors name the
    key). expand=False: no shard is listed (accounting from the config alone)."""
    sources = []
    for i, e in enumerate(cfg.data.sources):
        aug = source_augment(cfg, i)
        for name in e.modalities if expand else ():
            if MODALITIES[name].augment_config is not None:
                MODALITIES[name].prepare(getattr(aug, name))
        sources.append(Source(e.name, list_shards(e.shards) if expand else [], list(e.modalities), e.weight, aug))
    return sources


def tasks_from_config(cfg, expand: bool = True) -> tuple[dict, dict]:
    """Sources feeding the same modality pair form one task, named by the pair ("image-text"); its weight is
    their sum. data.tasks.<pair> sets the task's own batch size, loss weight, resolution and DropToken."""
    tasks, weights = {}, {}
    for src in make_sources(cfg, expand):
        name = pair_name(*src.modalities)
        if name not in tasks:
            terms = cfg.data.tasks.get(name)
            tasks[name] = TaskConfig(name, ordered(src.modalities), [],
                                     (terms and terms.batch_size) or cfg.data.batch_size,
                                     terms.loss_weight if terms else 1.0, terms.drop_token if terms else None,
                                     DecodeSettings.from_config(task_view(cfg, terms)),
                                     terms.start_step if terms else 0, grouping_of(terms))
        task = tasks[name]
        task.sources.append(src)
        weights[name] = weights.get(name, 0.0) + src.weight
    return tasks, weights


def grouping_of(terms) -> Grouping | None:
    return Grouping(terms.group_by, terms.group_size) if terms is not None and terms.group_by else None


def train_loader(cfg, seed: int) -> MultiTaskLoader:
    d = cfg.data
    tasks, weights = tasks_from_config(cfg)
    settings = DecodeSettings.from_config(cfg)
    loaders = {name: TaskLoader(task, settings, seed, d.num_workers, d.shuffle_slots, d.shuffle_buffer, d.pin_memory,
                                d.prefetch, d.max_consecutive_bad, d.worker_timeout) for name, task in tasks.items()}
    return MultiTaskLoader(loaders, weights, seed, {name: task.start_step for name, task in tasks.items()})
