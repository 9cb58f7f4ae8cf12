"""Exact InfoNCE of local rows against all columns, computed in column chunks with a running logsumexp and
recomputed in backward, so the logits never exist at more than (local rows x chunk) at a time.

`chunked_infonce(a, b_all, scale, offset, chunk)` = mean_i [logsumexp_j(scale * a_i . b_j) - scale * a_i . b_(offset+i)]
Gradients flow to `a`, `b_all` and `scale`, computed chunk by chunk from the saved per-row logsumexp.
"""
from __future__ import annotations

import torch


def _lse_and_positive(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, offset: int,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = a.size(0)
    running_max = torch.full((n,), float("-inf"), dtype=a.dtype, device=a.device)
    running_sum = torch.zeros(n, dtype=a.dtype, device=a.device)
    for start in range(0, b_all.size(0), chunk):
        logits = scale * (a @ b_all[start:start + chunk].t())  # (n, c)
        new_max = torch.maximum(running_max, logits.max(dim=1).values)
        running_sum = running_sum * (running_max - new_max).exp() + (logits - new_max[:, None]).exp().sum(1)
        running_max = new_max
    positive = scale * (a * b_all[offset:offset + n]).sum(1)
    return running_max + running_sum.log(), positive


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
