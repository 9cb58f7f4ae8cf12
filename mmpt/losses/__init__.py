"""Losses: contrastive (any modality pair) and captioning, combined into one objective (`objective.py`)."""
from __future__ import annotations

from mmpt.losses.captioning import CaptionLoss, caption_loss
from mmpt.losses.contrastive import ContrastiveLoss, contrastive_loss
from mmpt.losses.objective import contrastive_terms, local_terms, moe_terms, objective

__all__ = ["CaptionLoss", "ContrastiveLoss", "caption_loss", "contrastive_loss", "contrastive_terms", "local_terms",
           "moe_terms", "objective"]
