"""Losses: contrastive (any modality pair) and captioning, combined into one objective."""
from __future__ import annotations

import torch

from mmpt.losses.captioning import CaptionLoss, caption_loss
from mmpt.losses.contrastive import ContrastiveLoss, contrastive_loss
from mmpt.modality import pair_name, pairs

__all__ = ["CaptionLoss", "ContrastiveLoss", "caption_loss", "contrastive_loss", "contrastive_terms", "objective"]


def contrastive_terms(emb: dict, logit_scale: dict, loss_cfg, group=None, logit_bias: dict | None = None) -> tuple:
    """Weighted sum of the contrastive losses of every modality pair in `emb`, and the per-pair metrics
    (`contrastive_loss/<pair>`, `logit_scale/<pair>`, `logit_bias/<pair>`; pairs spelled as mmpt.modality)."""
    losses, total = {}, 0.0
    if loss_cfg.contrastive_kind == "sigmoid" and logit_bias is None:
        raise ValueError("loss.contrastive_kind=sigmoid, but the model has no logit biases: build it with "
                         "mmpt.model.build_for_run(cfg) (or build_model(..., init_logit_bias=...))")
    for a, b in pairs(emb):
        pair = pair_name(a, b)
        bias = logit_bias[pair] if logit_bias is not None and loss_cfg.contrastive_kind == "sigmoid" else None
        loss, _ = contrastive_loss(emb[a], emb[b], logit_scale[pair], group, chunk_size=loss_cfg.contrastive_chunk,
                                   ring=loss_cfg.contrastive_ring, kind=loss_cfg.contrastive_kind, logit_bias=bias,
                                   max_logit_scale=loss_cfg.max_logit_scale)
        losses[f"contrastive_loss/{pair}"] = loss
        losses[f"logit_scale/{pair}"] = logit_scale[pair].detach()
        if bias is not None:
            losses[f"logit_bias/{pair}"] = bias.detach()
        total = total + loss_cfg.contrastive_weight * loss
    return total, losses


def objective(out: dict, loss_cfg, group=None) -> dict:
    """Model output dict -> {"loss": weighted total, "contrastive_loss/<pair>", "caption_loss", ...}."""
    total, losses = contrastive_terms(out["emb"], out["logit_scale"], loss_cfg, group, out.get("logit_bias"))
    if "caption_logits" in out:
        losses["caption_loss"] = caption_loss(out["caption_logits"], out["caption_targets"])
        total = total + loss_cfg.caption_weight * losses["caption_loss"]
    total = total + moe_terms(out.get("aux", {}), losses)
    losses["loss"] = total if torch.is_tensor(total) else torch.zeros(())
    return losses


MOE_METRICS = ("dropped_rate", "router_entropy", "global_entropy", "balance")


def moe_terms(aux: dict, losses: dict):
    """Sum the MoE layers' weighted aux losses; add per-modality means of their metrics to `losses`.

    aux keys look like "<modality>.layer<i>.<name>" (see MultimodalModel.forward)."""
    total: float | torch.Tensor = 0.0
    per: dict[tuple[str, str], list] = {}  # (modality, metric) -> values of every MoE layer
    for key, value in aux.items():
        modality, _, name = key.split(".", 2)
        if name == "moe_loss":
            total = total + value
        elif name in MOE_METRICS or name == "expert_load":
            per.setdefault((modality, name), []).append(value)
    for (modality, name), values in per.items():
        if name == "expert_load":  # busiest expert's share x E: 1.0 = balanced, E = collapsed onto one expert
            losses[f"moe/{modality}/max_load"] = torch.stack([v.max() * v.numel() for v in values]).mean()
        else:
            losses[f"moe/{modality}/{name}"] = torch.stack(values).mean()
    if torch.is_tensor(total):
        losses["moe_loss"] = total.detach()
    return total
