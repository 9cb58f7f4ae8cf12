"""Captioning cross-entropy over the decoder's real target positions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy; logits (M, V), targets (M,). Computed in fp32."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


class CaptionLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits, targets):
        return caption_loss(logits, targets, self.label_smoothing)
