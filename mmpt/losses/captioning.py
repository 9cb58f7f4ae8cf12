"""Captioning cross-entropy over the decoder's real target positions."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


# train.compile runs the loss compiled: the vocabulary-wide softmax over every target position is a large
# memory-bound pass that inductor fuses. Dynamic: the number of target positions changes every batch.
_COMPILED: dict = {}
_USE_COMPILED = contextvars.ContextVar("mmpt_compiled_caption_loss", default=False)


@contextlib.contextmanager
def compiled_caption_loss(on: bool = True):
    """caption_loss calls inside run the compiled cross-entropy (a compiled TrainModule's forward)."""
    token = _USE_COMPILED.set(on)
    try:
        yield
    finally:
        _USE_COMPILED.reset(token)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy; logits (M, V), targets (M,). Computed in fp32."""
    if not _USE_COMPILED.get():
        return _cross_entropy(logits, targets, label_smoothing)
    if "cross_entropy" not in _COMPILED:
        _COMPILED["cross_entropy"] = torch.compile(_cross_entropy, dynamic=True)
    return _COMPILED["cross_entropy"](logits, targets, label_smoothing)


class CaptionLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        return caption_loss(logits, targets, self.label_smoothing)
