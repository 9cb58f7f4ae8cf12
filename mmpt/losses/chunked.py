"""Exact InfoNCE of local rows against all columns, computed in column chunks with a running logsumexp and
recomputed in backward, so the logits never exist at more than (local rows x chunk) at a time.

`chunked_infonce(a, b_all, scale, offset, chunk)` = mean_i [logsumexp_j(scale * a_i . b_j) - scale * a_i . b_(offset+i)]
Gradients flow to `a`, `b_all` and `scale`, computed chunk by chunk from the saved per-row logsumexp.
"""
from __future__ import annotations

import torch


def running_lse(rows: torch.Tensor, blocks, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """logsumexp_j(scale * rows_i . cols_j) over the columns of every block in `blocks` (any float dtype,
    scored in fp32), `chunk` columns at a time: the logits never exceed rows x chunk."""
    high = torch.full((rows.size(0),), float("-inf"), dtype=rows.dtype, device=rows.device)
    total = torch.zeros_like(high)
    for block in blocks:
        for start in range(0, block.size(0), chunk):
            logits = torch.mm(rows, block[start:start + chunk].float().t()).mul_(scale)
            new_high = torch.maximum(high, logits.amax(dim=1))
            total.mul_((high - new_high).exp_()).add_(logits.sub_(new_high[:, None]).exp_().sum(dim=1))
            high = new_high
    return high + total.log()


def _lse_and_positive(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, offset: int,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    positive = scale * (a * b_all[offset:offset + a.size(0)]).sum(1)
    return running_lse(a, [b_all], scale, chunk), positive


class ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b_all, scale, offset: int, chunk: int):
        lse, positive = _lse_and_positive(a, b_all, scale, offset, chunk)
        ctx.save_for_backward(a, b_all, scale, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad):
        a, b_all, scale, lse = ctx.saved_tensors
        n, offset, chunk = a.size(0), ctx.offset, ctx.chunk
        g = grad / n
        grad_a = torch.zeros_like(a)
        grad_b = torch.zeros_like(b_all)
        grad_scale = torch.zeros((), dtype=a.dtype, device=a.device)
        for start in range(0, b_all.size(0), chunk):
            cols = b_all[start:start + chunk]
            dots = a @ cols.t()
            probs = (scale * dots - lse[:, None]).exp() * g  # d loss / d logits, softmax part
            grad_a += scale * (probs @ cols)
            grad_b[start:start + chunk] += scale * (probs.t() @ a)
            grad_scale += (probs * dots).sum()
        # The positive term: -scale * a_i . b_(offset+i), for every local row.
        pos_b = b_all[offset:offset + n]
        grad_a -= g * scale * pos_b
        grad_b[offset:offset + n] -= g * scale * a
        grad_scale -= g * (a * pos_b).sum()
        return grad_a, grad_b, grad_scale.reshape(scale.shape), None, None


def chunked_infonce(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, offset: int,
                    chunk: int) -> torch.Tensor:
    return ChunkedInfoNCE.apply(a, b_all, scale, offset, max(1, chunk))
