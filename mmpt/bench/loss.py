"""Contrastive loss at N = 2, 4, 8 gloo processes (b rows of width d per rank) against open_clip, one run.

    mmpt bench loss --json

Per rank and method: forward + backward time (median of 3); peak memory of the loss forward + backward beyond
the local embeddings themselves (`mmpt.bench.common.PeakMemory` sees every tensor the loss allocates:
logits, gathered columns, ring buffers, the embeddings' gradients; the two b x d inputs are subtracted); bytes
this rank hands to torch.distributed, counted at the calls (`mmpt.distributed.CountBytes`). Methods: open_clip
ClipLoss(local_loss, gather_with_grad); ours exact (gather all, chunked logits); ours ring (column blocks
streamed, never gathered); ours grouped (GBA-ITC, g = N/2, with the gap: negatives per positive and loss vs
the global one).
Sigmoid (SigLIP): open_clip's SigLipLoss (its default bidirectional neighbour exchange) against ours ring.
Also the largest gradient difference between ours and open_clip, per loss kind.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmpt.bench.common import PeakMemory, median_ms
from mmpt.distributed import CountBytes
from mmpt.losses.contrastive import contrastive_loss, rank_groups


def _measure(step, input_bytes: int) -> dict:
    ms = median_ms(step, 3, before=dist.barrier)
    with PeakMemory() as tracker, CountBytes() as sent:
        step()
    peak = tracker.peak
    return {"ms": ms, "peak_mb": (peak - input_bytes) / 2**20, "bytes_sent": sent.bytes}


def _rank(rank: int, world: int, init: str, b: int, d: int, chunk: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # open_clip calls torch.distributed.nn.all_gather, deprecated in torch 2.14: one warning per call and rank.
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from open_clip.loss import ClipLoss, SigLipLoss


    group = rank_groups(max(1, world // 2))
    gen = torch.Generator().manual_seed(rank)
    a0 = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    b0 = F.normalize(a0 + 0.3 * torch.randn(b, d, generator=gen), dim=-1)
    clip = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    siglip, bias = SigLipLoss(rank=rank, world_size=world), torch.tensor(-10.0)
    grads, losses = {}, {}

    def run(name, loss_fn):
        def step():
            x, y, s = a0.clone().requires_grad_(), b0.clone().requires_grad_(), torch.tensor(10.0, requires_grad=True)
            loss = loss_fn(x, y, s)
            loss.backward()
            grads[name], losses[name] = (x.grad, y.grad), loss.detach()
        return _measure(step, 2 * a0.numel() * a0.element_size())

    result = {
        "open_clip": run("open_clip", lambda x, y, s: clip(x, y, s)),
        "ours_exact": run("exact", lambda x, y, s: contrastive_loss(x, y, s, chunk_size=chunk)[0]),
        "ours_ring": run("ring", lambda x, y, s: contrastive_loss(x, y, s, chunk_size=chunk, ring=True)[0]),
        "ours_grouped": {**run("grouped", lambda x, y, s: contrastive_loss(x, y, s, group=group, chunk_size=chunk)[0]),
                         "group_size": max(1, world // 2), "negatives_per_positive": max(1, world // 2) * b - 1,
                         "global_negatives_per_positive": world * b - 1},
    }
    result["open_clip_siglip"] = run("siglip", lambda x, y, s: siglip(x, y, s, bias))
    result["ours_sigmoid_ring"] = run("sigmoid", lambda x, y, s: contrastive_loss(
        x, y, s, kind="sigmoid", logit_bias=bias, chunk_size=chunk, ring=True)[0])
    result["max_grad_diff_vs_open_clip"] = max(float((p - q).abs().max()) for name in ("exact", "ring")
                                               for p, q in zip(grads[name], grads["open_clip"], strict=True))
    result["sigmoid_max_grad_diff_vs_open_clip"] = max(float((p - q).abs().max())
                                                       for p, q in zip(grads["sigmoid"], grads["siglip"], strict=True))
    # The grouped loss's gap: its mean over ranks against the global loss on the same embeddings.
    gap = torch.stack([losses["grouped"], losses["exact"]])
    dist.all_reduce(gap)
    result["ours_grouped"]["loss"], result["ours_grouped"]["global_loss"] = (gap / world).tolist()
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
    peers = {"ours_exact": "open_clip", "ours_ring": "open_clip", "ours_grouped": "open_clip",
             "ours_sigmoid_ring": "open_clip_siglip"}
    for name, peer in peers.items():
        for key in ("ms", "peak_mb", "bytes_sent"):
            r0[name][f"{key}_ratio"] = r0[name][key] / r0[peer][key]
    return r0


def run(b: int = 512, d: int = 512, chunk: int = 128, worlds=(2, 4, 8)) -> dict:
    out = {"bench": "loss", "rows_per_rank": b, "dim": d, "chunk": chunk, "backend": "gloo", "torch_threads": 1,
           "worlds": {str(n): bench_world(n, b, d, chunk) for n in worlds},
           "targets": {"peak_mb_ratio_at_8": 0.125, "grouped_bytes_ratio": "(g-1)/(N-1)"}}
    return out


def add_arguments(parser) -> None:
    """No flags: rows, width, chunk and process counts are the bench's definition."""


def main(args) -> dict:
    return run()
