"""Captioning cross-entropy over the decoder's real target positions, through its tied vocabulary projection."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def vocab_logits(hidden: torch.Tensor, table: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(M, D) hidden states -> (M, V) logits against a (V, D) token table (tied LM head), scaled as the
    embedding uses it."""
    return hidden @ (table if scale is None else table * scale.to(table.dtype)).t()


def _vocab_cross_entropy(hidden, table, scale, targets, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(vocab_logits(hidden, table, scale).float(), targets, label_smoothing=label_smoothing)


# train.compile runs the vocabulary projection and the cross-entropy as one compiled graph: the (M, V) logits,
# their softmax and its gradient are the largest memory passes of a step, and inductor fuses them with the
# table's scaling (measured on the bench's 49,408-token vocabulary, 320 targets, width 128, 2 threads:
# forward + backward 164 ms eager, 130 ms with only the cross-entropy compiled, 96 ms with all of it).
# Dynamic: the number of target positions changes every batch.
_COMPILED: dict = {}
_USE_COMPILED = contextvars.ContextVar("mmpt_compiled_caption_loss", default=False)


@contextlib.contextmanager
def compiled_caption_loss(on: bool = True):
    """caption_loss calls inside run compiled (a compiled TrainModule's forward)."""
    token = _USE_COMPILED.set(on)
    try:
        yield
    finally:
        _USE_COMPILED.reset(token)


def caption_loss(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                 scale: Optional[torch.Tensor] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy of `vocab_logits(hidden, table, scale)` against targets (M,), in fp32. Takes the
    hidden states, not the logits, so that the projection and the softmax can run as one pass."""
    if not _USE_COMPILED.get():
        return _vocab_cross_entropy(hidden, table, scale, targets, label_smoothing)
    if "cross_entropy" not in _COMPILED:
        _COMPILED["cross_entropy"] = torch.compile(_vocab_cross_entropy, dynamic=True)
    return _COMPILED["cross_entropy"](hidden, table, scale, targets, label_smoothing)


class CaptionLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, hidden, table, targets, scale=None):
        return caption_loss(hidden, table, targets, scale, self.label_smoothing)
