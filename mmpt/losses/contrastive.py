"""Exact distributed contrastive losses over any pair of embeddings (`emb_a`, `emb_b`), modality-agnostic.

Each rank scores its local rows against the columns of every rank of its group, in both directions: the
columns gathered with gradient (optionally in chunks, `chunked.py`) or streamed round a ring (`ring.py`);
InfoNCE or SigLIP (`sigmoid.py`). The mean of the per-rank losses equals the full-batch loss, and after the
usual gradient averaging across ranks the gradients equal the full-batch gradients (tested against float64).
Groups smaller than the world are GBA-ITC's grouped aggregation (`rank_groups`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmpt.losses.chunked import chunked_infonce
from mmpt.losses.comm import GatherWithGrad
from mmpt.losses.ring import ring_infonce
from mmpt.losses.sigmoid import sigmoid_loss


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _check_equal_sizes(n: int, group, device: torch.device) -> None:
    # On the embeddings' device: NCCL only moves CUDA tensors.
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], device=device), group=group)
    counts = [int(s) for s in sizes]
    if len(set(counts)) > 1:
        raise ValueError(f"contrastive_loss: local batch sizes differ across ranks {counts}; "
                         "use equal per-rank batches (drop the partial last batch)")


def contrastive_loss(emb_a: torch.Tensor, emb_b: torch.Tensor, logit_scale: torch.Tensor,
                     group: Optional[dist.ProcessGroup] = None, check_sizes: bool = True,
                     chunk_size: Optional[int] = None, ring: bool = False, kind: str = "softmax",
                     logit_bias: Optional[torch.Tensor] = None,
                     max_logit_scale: float = 100.0) -> tuple[torch.Tensor, dict]:
    """Symmetric InfoNCE (kind="softmax") or SigLIP (kind="sigmoid", needs `logit_bias`) of matching rows of
    emb_a and emb_b across all ranks of `group`.

    Returns this rank's loss (mean over ranks = the loss of the group's batch) and a report. Computed in fp32
    whatever the embedding dtype; embeddings travel between ranks in their own dtype (bf16: half the bytes);
    the temperature is clamped at `max_logit_scale`. `group` may be a subgroup (grouped aggregation,
    GBA-ITC: see `rank_groups`).
    With `chunk_size`, logits are computed `chunk_size` columns at a time with a running logsumexp and
    recomputed in backward (exact; logits memory local_rows x chunk instead of local_rows x group batch).
    With `ring`, column blocks are streamed around the ranks instead of gathered (`mmpt.losses.ring`): exact,
    and no rank ever holds the group's B x d columns.
    """
    if emb_a.shape != emb_b.shape:
        raise ValueError(f"contrastive_loss: emb_a {tuple(emb_a.shape)} and emb_b {tuple(emb_b.shape)} differ")
    if kind not in ("softmax", "sigmoid") or (kind == "sigmoid") != (logit_bias is not None):
        given = "given" if logit_bias is not None else "None"
        raise ValueError(f"contrastive_loss: kind={kind!r} with logit_bias {given} "
                         "(softmax takes no bias, sigmoid needs one)")
    # Embeddings are sent in their own dtype (bf16: half the bytes) and scored in fp32.
    a, b, scale = emb_a, emb_b, logit_scale.float().clamp(max=max_logit_scale)
    n, world = a.size(0), _world(group)
    if world > 1 and check_sizes:
        _check_equal_sizes(n, group, a.device)
    ring = ring and world > 1
    report = _report(kind, ring, n, world, a.size(1), a.element_size(), chunk_size, check_sizes)
    if kind == "sigmoid":
        assert logit_bias is not None  # checked above
        loss = sigmoid_loss(a, b, scale, logit_bias.float(), group, world, ring, chunk_size)
    elif ring:
        loss = ring_infonce(a, b, scale, group, chunk_size)
    else:
        loss = _gathered_infonce(a, b, scale, group, world, chunk_size)
    return loss, report


def _gathered_infonce(a, b, scale, group, world: int, chunk_size: Optional[int]) -> torch.Tensor:
    n = a.size(0)
    if world > 1:
        all_a, all_b = GatherWithGrad.apply(a, group), GatherWithGrad.apply(b, group)
        offset = dist.get_rank(group) * n
    else:
        all_a, all_b, offset = a, b, 0
    a, b, all_a, all_b = a.float(), b.float(), all_a.float(), all_b.float()
    if chunk_size:
        return (chunked_infonce(a, all_b, scale, offset, chunk_size)
                + chunked_infonce(b, all_a, scale, offset, chunk_size)) / 2
    labels = torch.arange(offset, offset + n, device=a.device)
    return (F.cross_entropy(scale * a @ all_b.t(), labels) + F.cross_entropy(scale * b @ all_a.t(), labels)) / 2


def _report(kind: str, ring: bool, n: int, world: int, dim: int, elem: int, chunk: Optional[int],
            checked: bool) -> dict:
    """What the loss costs this rank. bytes_sent: to other ranks, forward + backward (tests check it against
    the bytes counted at the torch.distributed calls); logits_bytes: the largest logits tile."""
    block, peers = elem * n * dim, world - 1
    if kind == "sigmoid":  # b gathered and its gradient returned, or b's blocks round then a's
        sent, columns = 2 * peers * block, (chunk or n) if ring else n * world
    elif ring:  # both sides' blocks round twice (forward, backward), with the row logsumexps in backward
        sent, columns = 4 * peers * block + 2 * peers * 4 * n, chunk or n  # fp32 logsumexps
    else:  # both sides gathered, their gradients reduce-scattered back
        sent, columns = 4 * peers * block, chunk or n * world
    sent += 8 * peers if checked else 0  # the batch-size check
    return {"group_size": world, "global_batch": n * world, "negatives_per_positive": n * world - 1,
            "gathered": world > 1 and not ring, "bytes_sent": sent,
            "logits_bytes": 4 * n * min(columns, n * world)}


def rank_groups(group_size: int) -> dist.ProcessGroup:
    """GBA-ITC: split the world into consecutive groups of `group_size` ranks (default use: one node) and
    return this rank's group. Every rank must call it (subgroup creation is collective)."""
    world = dist.get_world_size()
    if group_size <= 0 or world % group_size:
        raise ValueError(f"contrastive group size {group_size} must divide the world size {world}")
    mine, _ = dist.new_subgroups(group_size)
    return mine


class ContrastiveLoss(nn.Module):
    """`contrastive_loss` as a module: ContrastiveLoss(group, ring=True)(emb_a, emb_b, scale) -> (loss, report).
    Options (chunk_size, ring, kind, check_sizes) as there."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, **options):
        super().__init__()
        self.group, self.options = group, options

    def forward(self, emb_a, emb_b, logit_scale, logit_bias=None):
        return contrastive_loss(emb_a, emb_b, logit_scale, self.group, logit_bias=logit_bias, **self.options)
