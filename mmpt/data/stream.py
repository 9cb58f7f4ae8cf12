"""Webdataset streams: shards -> (resample | split by node and worker) -> samples -> shuffle -> decode -> batch.

Training streams are resampled: each (rank, worker) draws shards with its own deterministic seed, so the
stream never ends and no rank waits for another at an epoch boundary. Evaluation streams are finite and
split by node and worker, so every sample is seen exactly once.

Bad samples are skipped and counted per reason inside the worker; every batch carries the counts since the
previous batch under `"_skipped"` so the trainer can total them exactly across workers.
"""
from __future__ import annotations

import logging
import random
from collections import Counter

import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from mmpt.data.decode import BadSample, SampleDecoder
from mmpt.data.shards import list_shards

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped samples by reason in one worker; logs the first of each reason with shard and key."""

    def __init__(self):
        self.pending = Counter()
        self.seen = set()

    def record(self, reason: str, where: str, detail: str = "") -> None:
        self.pending[reason] += 1
        if reason not in self.seen:
            self.seen.add(reason)
            log.warning("skipping bad sample (%s) at %s %s (further ones are counted, not logged)", reason, where, detail)

    def decode_with(self, decoder):
        def run(sample):
            try:
                return decoder(sample)
            except BadSample as e:
                self.record(e.reason, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}", str(e))
                return None
        return run

    def tar_handler(self, exn: Exception) -> bool:
        self.record("corrupt_tar", getattr(exn, "args", ["?"])[-1] if exn.args else "?", repr(exn))
        return True  # keep going with the next sample/shard

    def take(self) -> dict:
        out, self.pending = dict(self.pending), Counter()
        return out


def _worker_seed(seed: int) -> int:
    rank, _, worker, _ = pytorch_worker_info()
    return seed * 1_000_003 + rank * 1009 + worker


def shuffle_stage(bufsize: int, seed: int):
    """Buffer shuffle seeded per (rank, worker) at iteration time, so workers don't share one sequence."""
    def stage(src):
        rng = random.Random(_worker_seed(seed))
        buf = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf
    return stage


def collate(counter: SkipCounter):
    def run(samples: list) -> dict:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text": torch.stack([s["text"] for s in samples]),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "__key__": [s["__key__"] for s in samples],
            "_skipped": counter.take(),
        }
    return run


def build_dataset(spec: str, *, image_size: int, context_length: int, batch_size: int, train: bool,
                  seed: int = 0, shuffle_buffer: int = 0) -> wds.DataPipeline:
    urls = list_shards(spec)
    counter = SkipCounter()
    if train:
        shards = [wds.ResampledShards(urls, seed=seed, deterministic=True,
                                      worker_seed=lambda: _worker_seed(0))]
    else:
        shards = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = shards + [wds.tarfile_to_samples(handler=counter.tar_handler)]
    if shuffle_buffer > 1:
        stages.append(shuffle_stage(shuffle_buffer, seed))
    decoder = SampleDecoder(image_size, context_length, train=train)
    stages += [wds.map(counter.decode_with(decoder)),
               wds.batched(batch_size, collation_fn=collate(counter), partial=not train)]
    return wds.DataPipeline(*stages)


def make_loader(spec: str, *, image_size: int, context_length: int, batch_size: int, train: bool,
                num_workers: int = 1, seed: int = 0, shuffle_buffer: int = 0) -> wds.WebLoader:
    dataset = build_dataset(spec, image_size=image_size, context_length=context_length,
                            batch_size=batch_size, train=train, seed=seed, shuffle_buffer=shuffle_buffer)
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                         persistent_workers=train and num_workers > 0,
                         prefetch_factor=4 if num_workers > 0 else None)
