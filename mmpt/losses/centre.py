"""Batch centring of the embeddings before the contrastive losses (`loss.centre_embeddings`).

At initialisation every sample of a modality points almost the same way: on the demo the mean cosine between
different clips is 0.96-0.98 (black backgrounds give every clip the same tokens, and attention pooling starts
as a mean), so the logits of one row hardly differ and every contrastive loss sits at ln(batch) for hundreds
of steps. Subtracting the batch's mean embedding, with gradient as BatchNorm does (without its scale), and
renormalising removes that shared direction from the start: on the demo image zero-shot at step 250 went
0.34 -> 0.91 (docs/training.md "Centred embeddings"). A fixed centre taken at step 0, or a running mean
without gradient, did not do it (0.43, 0.66): the shared direction drifts, and its gradient has to be removed
too.

The mean is over the contrastive group's batch (every rank of `group`), so the distributed loss stays the
full-batch loss (tested against float64) and GradCache's accumulated step stays exact: the centring is a
function of the whole batch's embeddings, like the loss itself. Evaluation has no batch: the model keeps a
running mean of the training batches' means per modality (`MultimodalModel.centres`) and subtracts that.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt.losses.comm import AllReduceWithGrad
from mmpt.losses.contrastive import _world


def batch_mean(emb: torch.Tensor, group=None, grad: bool = True) -> torch.Tensor:
    """fp32 mean of `emb`'s rows over every rank of `group` (the default group when distributed); with
    `grad`, differentiable to every rank's rows."""
    if _world(group) == 1:
        return emb.float().mean(0)
    stats = torch.cat([emb.float().sum(0), emb.new_full((1,), emb.size(0), dtype=torch.float32)])
    if grad:
        stats = AllReduceWithGrad.apply(stats, group)
    else:
        stats = stats.detach().clone()
        dist.all_reduce(stats, group=group)
    return stats[:-1] / stats[-1]


def centred(emb: torch.Tensor, group=None) -> torch.Tensor:
    """`emb` minus the group batch's mean, renormalised to unit length, in `emb`'s dtype."""
    return F.normalize(emb.float() - batch_mean(emb, group), dim=-1).to(emb.dtype)
