"""Losses: contrastive (any modality pair) and captioning, combined into one objective."""
from __future__ import annotations

import itertools

import torch

from mmpt.losses.captioning import CaptionLoss, caption_loss
from mmpt.losses.contrastive import ContrastiveLoss, contrastive_loss

__all__ = ["CaptionLoss", "ContrastiveLoss", "caption_loss", "contrastive_loss", "objective"]


def objective(out: dict, loss_cfg, group=None) -> dict:
    """Model output dict -> {"loss": weighted total, "<pair>_contrastive_loss", "caption_loss", ...}."""
    losses, total = {}, 0.0
    for a, b in itertools.combinations(sorted(out["emb"]), 2):
        pair = "|".join((a, b))
        loss, _ = contrastive_loss(out["emb"][a], out["emb"][b], out["logit_scale"][pair], group)
        losses[f"{a}_{b}_contrastive_loss"] = loss
        losses[f"{a}_{b}_logit_scale"] = out["logit_scale"][pair].detach()
        total = total + loss_cfg.contrastive_weight * loss
    if "caption_logits" in out:
        losses["caption_loss"] = caption_loss(out["caption_logits"], out["caption_targets"])
        total = total + loss_cfg.caption_weight * losses["caption_loss"]
    losses["loss"] = total if torch.is_tensor(total) else torch.zeros(())
    return losses
