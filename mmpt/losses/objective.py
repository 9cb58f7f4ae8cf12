"""The training objective, defined once for the plain step and for the accumulated (GradCache) step:

    loss = contrastive_weight x the contrastive loss of every modality pair   (couples every row of the batch)
         + caption_weight x the caption loss                                   (mean over the caption tokens)
         + the MoE layers' aux losses                                          (mean over micro-batches)

The contrastive terms need the whole batch's embeddings at once, the other ("local") terms only one
micro-batch's output. A plain step takes both from one model output (`objective`). An accumulated step
(mmpt.losses.accumulate, mmpt.train.accumulate) takes `contrastive_terms` once over every micro-batch's
embeddings and `local_terms` per micro-batch, weighted by its share; `accumulated_report` puts their reports
together into what `objective` reports for the whole batch.
"""
from __future__ import annotations

import torch

from mmpt.losses.captioning import caption_loss
from mmpt.losses.centre import centred
from mmpt.losses.contrastive import contrastive_loss
from mmpt.modality import pair_name, pairs

PAIR_PARAMS = ("logit_scale", "logit_bias")  # the model's per-pair outputs the contrastive terms take
MOE_METRICS = ("dropped_rate", "router_entropy", "global_entropy", "balance")


def contrastive_terms(emb: dict, logit_scale: dict, loss_cfg, group=None, logit_bias: dict | None = None) -> tuple:
    """Weighted sum of the contrastive losses of every modality pair in `emb`, and the per-pair metrics
    (`contrastive_loss/<pair>`, `logit_scale/<pair>`, `logit_bias/<pair>`; pairs spelled as mmpt.modality).
    With `loss.centre_embeddings` each modality's embeddings are first centred on the group batch's mean."""
    losses, total = {}, 0.0
    if loss_cfg.contrastive_kind == "sigmoid" and logit_bias is None:
        raise ValueError("loss.contrastive_kind=sigmoid, but the model has no logit biases: build it with "
                         "mmpt.model.build_for_run(cfg) (or build_model(..., init_logit_bias=...))")
    if loss_cfg.centre_embeddings:  # each modality once, whatever pairs it is in (mmpt.losses.centre)
        emb = {m: centred(e, group) for m, e in emb.items()}
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


def local_terms(out: dict, loss_cfg, caption_share: float = 1.0, micro_batches: int = 1) -> tuple:
    """The terms one micro-batch's output holds whole: the caption loss weighted by `caption_share` (this
    micro-batch's share of the step's caption tokens) and the MoE aux losses divided by `micro_batches`.
    Returns (weighted total, metrics: caption_loss, moe_loss, moe/<modality>/<metric>)."""
    metrics: dict = {}
    total: float | torch.Tensor = 0.0
    if "caption_hidden" in out and caption_share > 0:  # no caption tokens: nothing to average
        metrics["caption_loss"] = caption_loss(out["caption_hidden"], out["caption_table"], out["caption_targets"],
                                               out.get("caption_scale"))
        total = total + loss_cfg.caption_weight * caption_share * metrics["caption_loss"]
    return total + moe_terms(out.get("aux", {}), metrics) / micro_batches, metrics


def objective(out: dict, loss_cfg, group=None) -> dict:
    """Model output dict -> {"loss": weighted total, "contrastive_loss/<pair>", "caption_loss", ...}."""
    total, losses = contrastive_terms(out["emb"], out["logit_scale"], loss_cfg, group, out.get("logit_bias"))
    local, metrics = local_terms(out, loss_cfg)
    losses.update(metrics)
    total = total + local
    losses["loss"] = total if torch.is_tensor(total) else torch.zeros(())
    return losses


def accumulated_report(contrastive: tuple, parts: list[dict], caption_shares: list[float]) -> dict:
    """An accumulated step's report, as `objective` gives it for the whole batch. `contrastive`: the
    (total, metrics) of `contrastive_terms` over every micro-batch; `parts`: each micro-batch's `local_terms`
    metrics with its weighted total under "local_loss". The caption loss is averaged over every caption token,
    the MoE metrics over the micro-batches."""
    total, report = contrastive
    total = total + sum(part["local_loss"] for part in parts)
    captioned = [(part["caption_loss"], share) for part, share in zip(parts, caption_shares, strict=True)
                 if "caption_loss" in part]
    if captioned:
        report["caption_loss"] = sum(value * share for value, share in captioned)
    for key in parts[0]:
        if key not in ("local_loss", "caption_loss"):
            report[key] = torch.stack([part[key] for part in parts]).mean()
    report["loss"] = total if torch.is_tensor(total) else torch.zeros(())
    return report


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
