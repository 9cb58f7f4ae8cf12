"""Sigmoid contrastive loss (SigLIP, Zhai et al. 2023) over any pair of embeddings, exact across ranks.

Per rank r with local rows a_r, b_r and x_ij = s a_i . b_j + t over every rank's b_j:
    L_r = (1 / n) [sum_i sum_j softplus(x_ij) - sum_i x_ii]
(-log sigmoid(-x) = softplus(x) for every pair, and the positive's -log sigmoid(x) is softplus(x) - x). The
mean over ranks is the SigLIP loss of the whole batch, normalised by the batch size as in the paper.

No row normalisation couples the columns, so every (rows, block) tile stands alone:
- gathered (default): b is gathered with gradient, logits local rows x B;
- ring (`ring=True`): b's blocks go round the ring (`mmpt.losses.comm.circulate`) for the loss and a_r's
  gradient; in backward a's blocks go round so each rank scores the others' rows against its own b for
  b_r's gradient. 2 (N - 1) blocks sent per rank, two blocks and one (rows x chunk) tile held. As in
  `ring.py`, the other ranks' losses' terms are scaled by this rank's upstream gradient: weight every
  rank's loss alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt.losses.comm import GatherWithGrad, circulate


class RingSigmoid(torch.autograd.Function):
    """d L / d x_ij = sigmoid(x_ij) - [i == j]. Forward scores a_r against every b block and, while each tile
    is in hand, also sums a_r's gradient and the temperature and bias gradients (nothing normalises across
    columns, so they are final). Backward needs one more pass: every a block against b_r, for the others'
    losses' gradient of b_r. 2 (N - 1) blocks sent per rank in all, as open_clip's neighbour exchange."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, group, chunk: int):
        n, need_grad = a.size(0), any(ctx.needs_input_grad[:4])
        a32, b32 = a.float(), b.float()  # blocks travel in the embeddings' dtype; products are fp32
        total, ga, gs, gt = _rows_pass(a32, b, scale, bias, group, chunk, with_loss=True, with_grad=need_grad)
        dot_ab = torch.dot(a32.flatten(), b32.flatten())
        if need_grad:
            ctx.save_for_backward(a, b, scale, bias, ga.sub_(b32).mul_(scale), (gs - dot_ab).reshape(scale.shape),
                                  (gt - n).reshape(bias.shape))
        ctx.group, ctx.chunk = group, chunk
        return (total - scale * dot_ab - n * bias) / n

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, bias, ga, gs, gt = ctx.saved_tensors
        factor = grad / a.size(0)
        _, gb, _, _ = _rows_pass(b.float(), a, scale, bias, ctx.group, ctx.chunk, with_loss=False, with_grad=True)
        gb.sub_(a.float()).mul_(scale * factor)
        return ga * factor, gb, gs * factor, gt * factor, None, None


def _rows_pass(rows, cols, scale, bias, group, chunk: int, with_loss: bool, with_grad: bool):
    """Rows against every rank's cols: sum of softplus(x) and/or the sigmoid-weighted gradient sums (rows'
    gradient up to the scale factor, and the temperature's and bias's)."""
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    total, grad, gs, gt = zero.clone(), torch.zeros_like(rows) if with_grad else None, zero.clone(), zero.clone()
    for (block,) in circulate([cols], group):
        for start in range(0, block.size(0), chunk):
            part = block[start:start + chunk].float()
            dots = torch.mm(rows, part.t())
            logits = (dots * scale).add_(bias)
            if with_loss:
                total += F.softplus(logits).sum()
            if grad is not None:  # with_grad
                weights = logits.sigmoid_()
                gs += torch.dot(weights.flatten(), dots.flatten())
                gt += weights.sum()
                grad.addmm_(weights, part)
    return total, grad, gs, gt


def sigmoid_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, group=None,
                 world: int = 1, ring: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Embeddings in any float dtype (sent as they are, scored in fp32); fp32 scale and bias. See
    contrastive_loss(kind="sigmoid") for the public entry point. `chunk` applies to the ring only (the
    gathered path holds local rows x B logits, as open_clip's gather mode does)."""
    if ring and world > 1:
        return RingSigmoid.apply(a, b, scale, bias, group, max(1, chunk or a.size(0)))
    n = a.size(0)
    all_b = (GatherWithGrad.apply(b, group) if world > 1 else b).float()
    offset = dist.get_rank(group) * n if world > 1 else 0
    logits = scale * a.float() @ all_b.t() + bias
    rows = torch.arange(n, device=logits.device)
    positive = logits[rows, rows + offset]
    return (F.softplus(logits).sum() - positive.sum()) / n
