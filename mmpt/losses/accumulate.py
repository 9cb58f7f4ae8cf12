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

from typing import Callable

import torch

from mmpt.losses.contrastive import contrastive_loss


def rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def accumulated_contrastive_backward(encode_a: Callable, encode_b: Callable, micro_batches: list,
                                     logit_scale: torch.Tensor, **loss_kwargs) -> tuple[torch.Tensor, dict]:
    """Runs backward itself (gradients land on the encoders' parameters and the temperature); returns the
    detached loss and the loss report. `micro_batches` items are whatever encode_a/encode_b take."""
    states, cached_a, cached_b = [], [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(rng_state())
            cached_a.append(encode_a(mb))
            cached_b.append(encode_b(mb))
    emb_a = torch.cat(cached_a).requires_grad_()
    emb_b = torch.cat(cached_b).requires_grad_()
    loss, report = contrastive_loss(emb_a, emb_b, logit_scale, **loss_kwargs)
    loss.backward()
    start = 0
    for mb, state, part in zip(micro_batches, states, cached_a):
        end = start + part.size(0)
        set_rng_state(state)
        torch.autograd.backward([encode_a(mb), encode_b(mb)], [emb_a.grad[start:end], emb_b.grad[start:end]])
        start = end
    report["micro_batches"] = len(micro_batches)
    return loss.detach(), report
