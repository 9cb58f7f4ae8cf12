"""Contrastive batch accumulation (GradCache, Gao et al. 2021): the loss of k micro-batches as one batch.

    loss, report = accumulated_contrastive_backward(encode_a, encode_b, micro_batches, logit_scale, group=g)

1. encode every micro-batch without a graph and cache the embeddings;
2. compute the contrastive loss on the accumulated batch (any mode: all ranks, a rank group, chunked) and
   backpropagate it to the cached embeddings and the temperature only;
3. re-encode each micro-batch with a graph and backpropagate its slice of the cached embedding gradient.
Gradients equal one pass over the accumulated batch; activation memory is one micro-batch's. The RNG state
is replayed for the re-encode so dropout and DropToken make the same choices twice.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmpt.losses.contrastive import contrastive_loss


class RngReplay:
    """GradCache's two passes over each micro-batch must draw the same random numbers (dropout, DropToken):
    `record()` before the first (no-grad) pass of each, `replay(i)` before the second pass of the i-th."""

    def __init__(self) -> None:
        self.states: list = []

    def record(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.states.append((torch.get_rng_state(), cuda))

    def replay(self, i: int) -> None:
        cpu, cuda = self.states[i]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def accumulated_contrastive_backward(encode_a: Callable, encode_b: Callable, micro_batches: list,
                                     logit_scale: torch.Tensor, **loss_kwargs) -> tuple[torch.Tensor, dict]:
    """Runs backward itself (gradients land on the encoders' parameters and the temperature); returns the
    detached loss and the loss report. `micro_batches` items are whatever encode_a/encode_b take."""
    rng, cached_a, cached_b = RngReplay(), [], []
    with torch.no_grad():
        for mb in micro_batches:
            rng.record()
            cached_a.append(encode_a(mb))
            cached_b.append(encode_b(mb))
    emb_a = torch.cat(cached_a).requires_grad_()
    emb_b = torch.cat(cached_b).requires_grad_()
    loss, report = contrastive_loss(emb_a, emb_b, logit_scale, **loss_kwargs)
    loss.backward()
    grad_a, grad_b = emb_a.grad, emb_b.grad
    assert grad_a is not None and grad_b is not None
    start = 0
    for i, (mb, part) in enumerate(zip(micro_batches, cached_a, strict=True)):
        end = start + part.size(0)
        rng.replay(i)
        torch.autograd.backward([encode_a(mb), encode_b(mb)], [grad_a[start:end], grad_b[start:end]])
        start = end
    report["micro_batches"] = len(micro_batches)
    return loss.detach(), report
