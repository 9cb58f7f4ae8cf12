"""How embedding blocks move between ranks for the contrastive losses: gathered with gradient, or passed
round a ring one block at a time."""
from __future__ import annotations

import typing

import torch
import torch.distributed as dist


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Written out (not torch.distributed.nn.all_gather) because that one breaks in backward on gloo
    subgroups; a plain all_to_all on the group works on every backend and group.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.n = dist.get_rank(group), x.size(0)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A reduce-scatter: each rank receives every rank's gradient for its own rows and sums them. Written as
        # all_to_all (gloo has no reduce_scatter): (N-1)/N of the gathered size per rank, half an all_reduce.
        parts = [p.contiguous() for p in grad.split(ctx.n)]
        received = [torch.empty_like(parts[0]) for _ in parts]
        dist.all_to_all(received, parts, group=ctx.group)
        return torch.stack(received).float().sum(0), None  # summed in fp32 whatever travelled


def circulate(tensors: list, group):
    """Yield the tensors of every rank of `group` in turn, own first, each passed on to the next rank while
    the caller works on it. Two buffers per tensor whatever the group size."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    handle = typing.cast(dist.ProcessGroup, group or dist.group.WORLD)
    nxt = dist.get_global_rank(handle, (rank + 1) % world)
    prv = dist.get_global_rank(handle, (rank - 1) % world)
    current, spare = [t.contiguous() for t in tensors], None
    for step in range(world):
        requests, incoming = [], None
        if step < world - 1:
            incoming = spare if spare is not None else [torch.empty_like(t) for t in tensors]
            ops = [dist.P2POp(dist.isend, t, nxt, handle) for t in current]
            ops += [dist.P2POp(dist.irecv, t, prv, handle) for t in incoming]
            requests = dist.batch_isend_irecv(ops)
        try:
            yield current
        finally:  # also when the caller fails mid-pass: never leave a transfer into a buffer in flight
            for request in requests:
                request.wait()
        # The block just sent is free now (unless it is this rank's own input): it takes the next receive.
        spare = current if step > 0 else None
        current = incoming if incoming is not None else []


class AllReduceWithGrad(torch.autograd.Function):
    """all_reduce (sum) whose backward all-reduces the gradient: every rank's loss uses the sum, so each rank's
    share of it gets every rank's gradient (then averaged across ranks like any gradient, as GatherWithGrad's)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
