"""Exact symmetric InfoNCE with the columns streamed around a ring of ranks (Inf-CL style) instead of gathered.

Per rank r with local rows a_r, b_r the loss is L_r = (mean_i[lse_a_ri - pos_ri] + mean_i[lse_b_ri - pos_ri]) / 2
with lse_a_ri = logsumexp_j(s a_ri . b_j) over every rank's b (and the mirror for b). Forward: two passes, one
per direction; in each the other side's blocks go round the ring (double-buffered, the send of one block
overlapping the scores of the one in hand) and a running logsumexp is kept, `chunk` columns at a time.

Backward needs no gradient accumulators travelling home. The gradient of a_r has a row term (a_r against
every b_k, weights exp(s a.b - lse_a_r)) and a column term (every b_k as rows of their own losses against a_r,
weights exp(s a.b - lse_b_k)); both use the same tile a_r . b_k^T. So one pass circulating (b_k, lse_b_k)
gives all of a_r's gradient, a second circulating (a_k, lse_a_k) all of b_r's. Every rank sends each block
4 (N - 1) times in all, the bytes of open_clip's gather forward + reduce-scatter backward, and holds two
blocks and two (rows x chunk) tiles, never the N x b gathered columns or their gradient.

Gradient convention as the gather path: mean over ranks = global loss; each rank's embedding gradient is the
sum of every rank's loss gradient for its rows, the scale gradient that of its own loss. One assumption the
gather path does not make: the column terms (other ranks' losses) are scaled by this rank's upstream
gradient, so every rank must weight its loss alike (true of the objective and of DeepSpeed's loss scaling).
"""
from __future__ import annotations

import torch

from mmpt.losses.chunked import running_lse
from mmpt.losses.comm import circulate


def _lse(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, group, chunk: int) -> torch.Tensor:
    """logsumexp_j(scale * rows_i . cols_j) over the columns of every rank of the group."""
    return running_lse(rows, (block for (block,) in circulate([cols], group)), scale, chunk)


def _grad(rows, cols, lse_rows, lse_cols, scale, group, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax part of d(sum_k L_k)/d rows (up to the factor scale / 2n), and of dL_r/d scale (row term)."""
    grad = torch.zeros_like(rows)
    grad_scale = torch.zeros((), dtype=rows.dtype, device=rows.device)
    for block, block_lse in circulate([cols, lse_cols], group):
        for start in range(0, block.size(0), chunk):
            part = block[start:start + chunk].float()
            dots = torch.mm(rows, part.t())
            weights = (dots * scale).sub_(lse_rows[:, None]).exp_()  # row term: these rows' softmax
            grad_scale += torch.dot(weights.flatten(), dots.flatten())
            # Column term: the block's rows' softmax over these rows, computed in place of the dots.
            weights.add_(dots.mul_(scale).sub_(block_lse[None, start:start + chunk]).exp_())
            grad.addmm_(weights, part)
    return grad, grad_scale


class RingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, group, chunk: int):
        # Blocks travel in the embeddings' dtype (bf16: half the bytes); every product is fp32.
        a32, b32 = a.float(), b.float()
        lse_a, lse_b = _lse(a32, b, scale, group, chunk), _lse(b32, a, scale, group, chunk)
        positive = scale * torch.bmm(a32.unsqueeze(1), b32.unsqueeze(2)).view(-1)  # no n x d temporary
        ctx.save_for_backward(a, b, scale, lse_a, lse_b)
        ctx.group, ctx.chunk = group, chunk
        return ((lse_a - positive).mean() + (lse_b - positive).mean()) / 2

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, lse_a, lse_b = ctx.saved_tensors
        a32, b32 = a.float(), b.float()
        factor = grad / (2 * a.size(0))
        ga, gs_a = _grad(a32, b, lse_a, lse_b, scale, ctx.group, ctx.chunk)
        ga.sub_(b32, alpha=2).mul_(scale * factor)  # the positives: -2 s b_r, from both directions
        gb, gs_b = _grad(b32, a, lse_b, lse_a, scale, ctx.group, ctx.chunk)
        gb.sub_(a32, alpha=2).mul_(scale * factor)
        gs = (gs_a + gs_b - 2 * torch.dot(a32.flatten(), b32.flatten())) * factor
        return ga, gb, gs.reshape(scale.shape), None, None


def ring_infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, group=None,
                 chunk: int | None = None) -> torch.Tensor:
    return RingInfoNCE.apply(a, b, scale, group, max(1, chunk or a.size(0)))
