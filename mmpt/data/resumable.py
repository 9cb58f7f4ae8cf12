"""The training stream of one task inside one DataLoader worker: resampled shards from weighted sources,
interleaved shard slots, a shuffle buffer, decode, batch — and a small state that resumes it exactly.

Every random decision is drawn from an RNG seeded by (seed, rank, logical worker, what, counter), so the
stream is a pure function of its counters. The state is those counters, the open shard of each slot with
its offset, and the shuffle buffer as (shard, index) references; restoring re-opens each slot's shard and
skips to its offset, and re-reads the buffered samples by reference. No sample is repeated or skipped.
"""
from __future__ import annotations

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
                 counter: SkipCounter, state: dict | None = None):
        self.sources, self.key = sources, (seed, rank, worker)
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
        while True:
            self.buffer.append(self._draw())
            if len(self.buffer) >= self.buffer_size:
                i = rng_for(*self.key, "pop", self.drawn).randrange(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                sample = self.buffer.pop()
                sample["__seed__"] = zlib.crc32(f"{self.key}:aug:{self.drawn}".encode())
                yield sample

    def state(self) -> dict:
        return {"drawn": self.drawn, "opened": list(self.opened),
                "slots": [[src, slot, url, offset] for (src, slot), (url, offset, _) in sorted(self.slots.items())],
                "buffer": [[s["__url__"], s["__index__"], s["__source__"]] for s in self.buffer]}


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
