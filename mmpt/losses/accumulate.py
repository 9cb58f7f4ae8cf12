"""Contrastive batch accumulation (GradCache, Gao et al. 2021): the loss of k micro-batches as one batch.

    loss, report = accumulated_contrastive_backward(encode_a, encode_b, micro_batches, logit_scale, group=g)

1. encode every micro-batch without a graph and cache the embeddings;
2. compute the contrastive loss on the accumulated batch (any mode: all ranks, a rank group, chunked) and
   backpropagate it to the cached embeddings and the temperature only;
3. re-encode each micro-batch with a graph and backpropagate its slice of the cached embedding gradient.
Gradients equal one pass over the accumulated batch; activation memory is one micro-batch's. The RNG state
is replayed for the re-encode so dropout and DropToken make the same choices twice.

`accumulated_contrastive_backward` does all three for one pair of encoders. For the training objective
(mmpt.losses.objective) under a DeepSpeed engine, mmpt.train.accumulate runs the passes and takes the loss
side from here: `cached_gradients` (step 2), `micro_batch_shares` and `surrogate` (step 3's loss).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from mmpt.losses.contrastive import contrastive_loss
from mmpt.losses.objective import contrastive_terms, local_terms


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


def cached_gradients(embs: dict, pair_values: dict, loss_cfg, group=None) -> tuple[dict, dict, tuple]:
    """Step 2 for the training objective: its contrastive terms on every micro-batch's embeddings together
    (`embs`: concatenated, by modality; `pair_values`: the model's per-pair temperatures and biases),
    differentiated to those embeddings and per-pair values only. Returns (embedding gradients, per-pair
    gradients, the terms' detached (total, metrics))."""
    embs = {m: e.detach().requires_grad_() for m, e in embs.items()}
    leaves = {k: {p: v.detach().requires_grad_() for p, v in d.items()} for k, d in pair_values.items()}
    with torch.enable_grad():
        total, metrics = contrastive_terms(embs, leaves["logit_scale"], loss_cfg, group, leaves.get("logit_bias"))
    if not torch.is_tensor(total):  # a task with one modality has no contrastive pair
        return {}, {}, (total, metrics)
    total.backward()
    pair_grads = {k: {p: v.grad for p, v in d.items() if v.grad is not None} for k, d in leaves.items()}
    detached = (total.detach(), {k: v.detach() for k, v in metrics.items()})
    return {m: e.grad for m, e in embs.items()}, pair_grads, detached


def micro_batch_shares(emb_grad: dict, pair_grad: dict, sizes: list[int], caption_tokens: list) -> list[dict]:
    """Each micro-batch's `cached` argument of `surrogate`: its rows of the embedding gradients, the per-pair
    gradients (the first micro-batch's only: the step's temperatures count once), its share of the step's
    caption tokens, and how many micro-batches the step has."""
    everything, start, shares = sum(caption_tokens), 0, []
    for i, (n, tokens) in enumerate(zip(sizes, caption_tokens, strict=True)):
        shares.append({"emb_grad": {m: g[start:start + n] for m, g in emb_grad.items()},
                       "pair_grad": pair_grad if i == 0 else {},
                       "caption_share": tokens / everything if everything else 0.0,
                       "micro_batches": len(sizes)})
        start += n
    return shares


def surrogate(out: dict, cached: dict, loss_cfg) -> dict:
    """Step 3's loss of one micro-batch (the model's output `out` with a graph): a scalar whose gradient is
    this micro-batch's share of the accumulated objective's gradient, sum(emb x cached gradient) plus the
    per-pair terms plus its weighted local terms (caption, MoE aux). "local_loss": the local terms' value,
    which the step's report adds up (mmpt.losses.objective.accumulated_report)."""
    total = sum((out["emb"][m].float() * g).sum() for m, g in cached["emb_grad"].items())
    for key, grads in cached["pair_grad"].items():
        total = total + sum(out[key][p] * g for p, g in grads.items())
    local, metrics = local_terms(out, loss_cfg, cached["caption_share"], cached["micro_batches"])
    return {"loss": total + local, "local_loss": torch.as_tensor(local).detach(), **metrics}


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
