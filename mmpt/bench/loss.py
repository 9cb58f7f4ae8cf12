"""Contrastive loss at N = 2, 4, 8 gloo processes (b rows of width d per rank) against open_clip, one run.

    mmpt bench loss --json

Per rank and method: forward + backward time (median of 3), peak memory of the loss forward + backward beyond
the local embeddings (torch's MemTracker: every tensor the loss allocates, logits and gathered columns
included), and bytes each rank sends in collectives (from the collective sizes: all_gather sends the local
block to N-1 peers, and both open_clip's and our backward on gloo are an all_to_all of the same size). Methods: open_clip ClipLoss(local_loss, gather_with_grad);
ours exact (gather all, chunked logits); ours ring (column blocks streamed, never gathered; forward N-1
passes of 2 blocks, backward N passes of 4); ours grouped (GBA-ITC, g = N/2). Also the largest gradient
difference between ours exact and open_clip.
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _measure(fn) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracker = MemTracker()
    with tracker:
        fn()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20}


def _rank(rank: int, world: int, init: str, b: int, d: int, chunk: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from open_clip.loss import ClipLoss

    from mmpt.losses.contrastive import contrastive_loss, rank_groups

    group = rank_groups(max(1, world // 2))
    gen = torch.Generator().manual_seed(rank)
    a0 = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    b0 = F.normalize(a0 + 0.3 * torch.randn(b, d, generator=gen), dim=-1)
    clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    grads = {}

    def run(name, loss_fn):
        def step():
            x, y, s = a0.clone().requires_grad_(), b0.clone().requires_grad_(), torch.tensor(10.0, requires_grad=True)
            loss_fn(x, y, s).backward()
            grads[name] = (x.grad, y.grad)
        return step

    block = b * d * 4
    result = {
        "open_clip": {**_measure(run("open_clip", lambda x, y, s: clip(x, y, s))), "bytes_sent": 2 * 2 * (world - 1) * block},
        "ours_exact": {**_measure(run("ours", lambda x, y, s: contrastive_loss(x, y, s, chunk_size=chunk)[0])),
                       "bytes_sent": 2 * 2 * (world - 1) * block},
        "ours_ring": {**_measure(run("ring", lambda x, y, s: contrastive_loss(x, y, s, ring=True)[0])),
                      "bytes_sent": (2 * (world - 1) + 4 * world) * block},
        "ours_grouped": {**_measure(run("grouped", lambda x, y, s: contrastive_loss(x, y, s, group=group, chunk_size=chunk)[0])),
                         "bytes_sent": 2 * 2 * (world // 2 - 1) * block, "group_size": world // 2},
    }
    result["max_grad_diff_vs_open_clip"] = max(float((p - q).abs().max()) for name in ("ours", "ring")
                                               for p, q in zip(grads[name], grads["open_clip"]))
    buf = io.BytesIO()
    torch.save(result, buf)
    queue.put((rank, buf.getvalue()))
    dist.barrier()
    dist.destroy_process_group()


def bench_world(world: int, b: int, d: int, chunk: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, world, os.path.join(tmp, "init"), b, d, chunk, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in range(world))
        for p in procs:
            p.join(timeout=120)
    r0 = torch.load(io.BytesIO(results[0]), weights_only=False)  # rank 0 stands for all (same shapes)
    theirs = r0["open_clip"]
    for name in ("ours_exact", "ours_ring", "ours_grouped"):
        for key in ("ms", "peak_mb", "bytes_sent"):
            r0[name][f"{key}_ratio"] = r0[name][key] / theirs[key]
    return r0


def run(b: int = 512, d: int = 512, chunk: int = 256, worlds=(2, 4, 8)) -> dict:
    out = {"bench": "loss", "rows_per_rank": b, "dim": d, "chunk": chunk, "backend": "gloo", "torch_threads": 1,
           "worlds": {str(n): bench_world(n, b, d, chunk) for n in worlds},
           "targets": {"peak_mb_ratio_at_8": 0.125, "grouped_bytes_ratio": "(g-1)/(N-1)"}}
    return out
