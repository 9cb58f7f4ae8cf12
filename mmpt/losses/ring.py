"""Exact symmetric InfoNCE with the columns streamed around a ring of ranks (Inf-CL style) instead of gathered.

Forward: each rank scores its local rows against the column block it holds, keeps a running logsumexp, and
passes the block on (N - 1 times). Backward: the blocks go round again, each carrying the gradient of its
columns that every rank adds to, so after N passes each block's gradient arrives home. Per rank the loss
holds two blocks and one block-by-block logits tile, never the N x b gathered columns.
The per-rank loss and gradients follow the same convention as the gather path (mean over ranks = global loss;
each rank's gradient is the sum of every rank's loss gradient for its rows).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _pass_on(tensors: list, group) -> list:
    """Send to the next rank of the group, receive from the previous one."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    group = group or dist.group.WORLD
    nxt, prv = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _update(running: tuple, logits: torch.Tensor) -> tuple:
    high, total = running
    new_high = torch.maximum(high, logits.max(dim=1).values)
    return new_high, total * (high - new_high).exp() + (logits - new_high[:, None]).exp().sum(1)


class RingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, group):
        world = dist.get_world_size(group)
        empty = (torch.full((a.size(0),), float("-inf"), dtype=a.dtype), torch.zeros(a.size(0), dtype=a.dtype))
        run_a, run_b = empty, (empty[0].clone(), empty[1].clone())
        blk_a, blk_b = a, b
        for step in range(world):
            run_a = _update(run_a, scale * (a @ blk_b.t()))
            run_b = _update(run_b, scale * (b @ blk_a.t()))
            if step < world - 1:
                blk_a, blk_b = _pass_on([blk_a, blk_b], group)
        lse_a, lse_b = run_a[0] + run_a[1].log(), run_b[0] + run_b[1].log()
        positive = scale * (a * b).sum(1)
        ctx.save_for_backward(a, b, scale, lse_a, lse_b)
        ctx.group = group
        return ((lse_a - positive).mean() + (lse_b - positive).mean()) / 2

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, lse_a, lse_b = ctx.saved_tensors
        group, world = ctx.group, dist.get_world_size(ctx.group)
        ga, gb = torch.zeros_like(a), torch.zeros_like(b)
        gs = torch.zeros((), dtype=a.dtype)
        blk_a, blk_b = a, b
        acc_a, acc_b = torch.zeros_like(a), torch.zeros_like(b)  # gradients of the blocks in hand
        for _ in range(world):
            dots = a @ blk_b.t()
            probs = (scale * dots - lse_a[:, None]).exp()
            ga += scale * (probs @ blk_b)
            acc_b += scale * (probs.t() @ a)
            gs += (probs * dots).sum()
            dots = b @ blk_a.t()
            probs = (scale * dots - lse_b[:, None]).exp()
            gb += scale * (probs @ blk_a)
            acc_a += scale * (probs.t() @ b)
            gs += (probs * dots).sum()
            blk_a, blk_b, acc_a, acc_b = _pass_on([blk_a, blk_b, acc_a, acc_b], group)
        # After N passes every accumulator is back with the rank that owns its rows.
        ga += acc_a - 2 * scale * b
        gb += acc_b - 2 * scale * a
        gs -= 2 * (a * b).sum()
        factor = grad / (2 * a.size(0))
        return ga * factor, gb * factor, (gs * factor).reshape(scale.shape), None


def ring_infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, group=None) -> torch.Tensor:
    return RingInfoNCE.apply(a, b, scale, group)
