"""The training stream of one task inside one DataLoader worker: resampled shards from weighted sources,
interleaved shard slots, a shuffle buffer, decode, batch — and a small state that resumes it exactly.

Every random decision is drawn from an RNG seeded by (seed, rank, logical worker, what, counter), so the
stream is a pure function of its counters. The state is those counters, the open shard of each slot with
its offset, and the shuffle buffer as (shard, index) references; restoring re-opens each slot's shard and
skips to its offset, and re-reads the buffered samples by reference. No sample is repeated or skipped.

Grouped (data.tasks.<pair>.group_by): the stream hands out runs of `size` buffered samples that share one field of
their json (e.g. the class), so a batch of B holds B/size groups: each sample meets size-1 negatives of its own
group (P x K sampling, as in metric learning). The run's group and the samples left in it are part of the state.
"""
from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds

from mmpt.data.samples import BadSample
from mmpt.errors import DataError


@dataclass
class Source:
    name: str
    urls: list
    modalities: list
    weight: float = 1.0
    augment: Any = None  # this source's AugmentConfig (mmpt.config.source_augment); None: the loader's settings'


@dataclass
class Grouping:
    field: str  # the json field samples of a group share
    size: int  # samples in a row from one group


def group_of(sample: dict, field: str) -> str | None:
    """The sample's json[field] as a key (None without a json, a readable one, or the field): such samples form
    a group of their own. Cached in the sample, as the buffer asks again for each pop."""
    if "__group__" not in sample:
        try:
            meta = json.loads(sample["json"]) if "json" in sample else None
        except (ValueError, UnicodeDecodeError):
            meta = None  # the decoder counts the bad json when this sample is decoded
        value = meta.get(field) if isinstance(meta, dict) else None
        sample["__group__"] = None if value is None else json.dumps(value, sort_keys=True)
    return sample["__group__"]


def rng_for(*parts) -> random.Random:
    return random.Random(zlib.crc32(":".join(map(str, parts)).encode()))


def shard_samples(url: str, on_error):
    """Raw samples of one tar shard (webdataset's tar reader), each with its index in the shard."""
    for i, sample in enumerate(wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}]))):
        sample["__index__"] = i
        yield sample


class SkipCounter:
    """Skipped samples by reason and by shard, since the last batch; logs the first of each reason."""

    def __init__(self, log):
        self.reasons, self.shards, self.seen, self.log = Counter(), Counter(), set(), log

    def record(self, reason: str, url: str, key: str, detail: str = "") -> None:
        self.reasons[reason] += 1
        self.shards[url] += 1
        if reason not in self.seen:
            self.seen.add(reason)
            self.log.warning("skipping bad sample (%s) at %s:%s %s (further ones are counted, not logged)",
                             reason, url, key, detail)

    def tar_handler(self, url: str):
        def handle(exn: Exception) -> bool:
            self.record("corrupt_tar", url, "?", repr(exn))
            return True
        return handle

    def take(self) -> dict:
        out = {"reasons": dict(self.reasons), "shards": dict(self.shards)}
        self.reasons, self.shards = Counter(), Counter()
        return out


class WorkerStream:
    """One logical worker's infinite, exactly resumable stream of raw samples."""

    def __init__(self, sources: list, seed: int, rank: int, worker: int, slots: int, buffer: int,
                 counter: SkipCounter, state: dict | None = None, grouping: Grouping | None = None):
        self.sources, self.key, self.grouping = sources, (seed, rank, worker), grouping
        self.n_slots, self.buffer_size, self.counter = max(1, slots), buffer, counter
        self.weights = [s.weight for s in sources]
        state = state or {}
        self.drawn = state.get("drawn", 0)  # samples taken from slots so far
        self.opened = list(state.get("opened", [0] * len(sources)))  # shards opened, per source
        self.slots = {}  # (source, slot) -> [url, offset, iterator]
        for entry in state.get("slots", []):
            src, slot, url, offset = entry
            self.slots[(src, slot)] = [url, offset, self._open(url, skip=offset)]
        self.buffer = self._rebuild(state.get("buffer", []))
        # Grouped streams: the current run's group and how many of it are still to come.
        self.run_group, self.run_left = state.get("run_group"), state.get("run_left", 0)

    def _open(self, url: str, skip: int = 0):
        it = shard_samples(url, self.counter.tar_handler(url))
        for _ in range(skip):
            next(it, None)
        return it

    def _rebuild(self, refs: list) -> list:
        wanted: dict = {}
        for url, index, _ in refs:
            wanted.setdefault(url, set()).add(index)
        found = {}
        for url, indices in wanted.items():
            for sample in shard_samples(url, self.counter.tar_handler(url)):
                if sample["__index__"] in indices:
                    found[(url, sample["__index__"])] = sample
                if sample["__index__"] >= max(indices):
                    break
        return [{**found[(u, i)], "__source__": src} for u, i, src in refs if (u, i) in found]

    def _next_from_slot(self, src: int, slot: int) -> dict:
        for _ in range(1000):
            entry = self.slots.get((src, slot))
            if entry is None:
                n = self.opened[src]
                self.opened[src] += 1
                urls = self.sources[src].urls
                url = urls[rng_for(*self.key, "shard", src, n).randrange(len(urls))]
                entry = self.slots[(src, slot)] = [url, 0, self._open(url)]
            sample = next(entry[2], None)
            if sample is not None:
                entry[1] += 1
                sample["__source__"] = src
                return sample
            del self.slots[(src, slot)]  # shard exhausted (or unreadable): open the next one
        raise DataError(f"source '{self.sources[src].name}': 1000 shards in a row yielded no sample "
                        f"(last: {entry[0] if entry else '?'}); are they empty or unreadable?")

    def _draw(self) -> dict:
        pick = rng_for(*self.key, "draw", self.drawn)
        src = pick.choices(range(len(self.sources)), weights=self.weights)[0]
        self.drawn += 1
        return self._next_from_slot(src, pick.randrange(self.n_slots))

    def __iter__(self):
        if self.grouping is not None:
            yield from self._grouped()
        while True:
            self.buffer.append(self._draw())
            if len(self.buffer) >= self.buffer_size:
                i = rng_for(*self.key, "pop", self.drawn).randrange(len(self.buffer))
                sample = self._take(i)
                sample["__seed__"] = zlib.crc32(f"{self.key}:aug:{self.drawn}".encode())
                yield sample

    def _take(self, i: int) -> dict:
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _grouped(self):
        """Runs of `grouping.size` samples sharing json[field], each drawn at random among the buffered ones of
        the run's group; a run starts with the group of a random buffered sample, so groups come as often as
        the stream holds them. A group the next buffer_size draws do not bring back ends its run early."""
        while True:
            while len(self.buffer) < max(1, self.buffer_size):
                self.buffer.append(self._draw())
            pick = rng_for(*self.key, "group-pop", self.emitted)
            if self.run_left <= 0:
                self.run_group = self._group(pick.randrange(len(self.buffer)))
                self.run_left = self.grouping.size
            members = [i for i in range(len(self.buffer)) if self._group(i) == self.run_group]
            for _ in range(max(1, self.buffer_size)):
                if members:
                    break
                self.buffer.append(self._draw())
                if self._group(-1) == self.run_group:
                    members = [len(self.buffer) - 1]
            if not members:  # the group ran out: a new run from any buffered sample
                members = [pick.randrange(len(self.buffer))]
                self.run_group, self.run_left = self._group(members[0]), self.grouping.size
            sample = self._take(members[pick.randrange(len(members))])
            self.run_left -= 1
            sample["__seed__"] = zlib.crc32(f"{self.key}:aug:group:{self.emitted}".encode())
            yield sample

    def _group(self, i: int) -> str | None:
        assert self.grouping is not None
        return group_of(self.buffer[i], self.grouping.field)

    def state(self) -> dict:
        state = {"drawn": self.drawn, "opened": list(self.opened),
                 "slots": [[src, slot, url, offset] for (src, slot), (url, offset, _) in sorted(self.slots.items())],
                 "buffer": [[s["__url__"], s["__index__"], s["__source__"]] for s in self.buffer]}
        if self.grouping is not None:
            state.update(run_group=self.run_group, run_left=self.run_left)
        return state

    @property
    def emitted(self) -> int:
        """Samples handed out so far: every drawn sample is either handed out or still buffered."""
        return self.drawn - len(self.buffer)


def collate(samples: list, modalities: list) -> dict:
    batch = {m: torch.stack([s[m] for s in samples]) for m in modalities}
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    batch["__key__"] = [s["__key__"] for s in samples]
    return batch


def batches(stream: WorkerStream, decoders: list, batch_size: int, modalities: list, counter: SkipCounter,
            worker: int, max_bad: int = 1000):
    """Decode and batch; each batch carries the worker's state after its last sample and the skip counts.
    A source with max_bad undecodable samples in a row (or no readable shard) ends the stream with a batch
    holding only `_error`: raised in the worker, DataLoader would wrap the message in a traceback."""
    buf, bad_run = [], Counter()
    try:
        for raw in stream:
            src = raw["__source__"]
            try:
                buf.append(decoders[src](raw))
                bad_run[src] = 0
            except BadSample as e:
                counter.record(e.reason, raw.get("__url__", "?"), raw.get("__key__", "?"), str(e))
                bad_run[src] += 1
                if bad_run[src] >= max_bad:
                    raise DataError(f"source '{stream.sources[src].name}': {bad_run[src]} samples in a row could "
                                    f"not be decoded, over data.max_consecutive_bad={max_bad} (this one: "
                                    f"{e.reason} at {raw.get('__url__', '?')}:{raw.get('__key__', '?')} {e}; "
                                    f"skipped so far: {dict(counter.reasons)})") from None
            if len(buf) == batch_size:
                batch = collate(buf, modalities)
                batch.update(_state=stream.state(), _worker=worker, _skipped=counter.take())
                yield batch
                buf = []
    except DataError as e:
        yield {"_error": str(e)}
