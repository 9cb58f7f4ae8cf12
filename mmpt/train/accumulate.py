"""One optimizer step over k micro-batches with the contrastive loss on all of them (GradCache under DeepSpeed).

    torchrun --nproc_per_node=2 -m mmpt.cli train --config demo train.accumulate=4

Plain gradient accumulation would give each micro-batch its own, k times smaller, contrastive batch. Here:
1. every micro-batch is encoded without a graph (through the engine, so ZeRO-3 gathers parameters) and its
   embeddings and temperatures are kept;
2. the contrastive losses of every pair are computed on the k micro-batches' embeddings together (any mode:
   gathered, ring, grouped, chunked) and differentiated to those embeddings and temperatures only;
3. each micro-batch is encoded again with a graph, RNG replayed so dropout and DropToken choose the same,
   and `engine.backward` runs on a surrogate whose gradient is the cached one: sum(emb * d loss/d emb), plus
   the temperature (and bias) terms once, plus the micro-batch's share of the caption loss (weighted by its share of the
   caption tokens, so the sum is the mean over all tokens) and 1/k of its MoE aux loss.
Contrastive and caption gradients equal one pass over the k micro-batches (tested); MoE balance losses are
per micro-batch, as in any gradient accumulation. Activation memory is one micro-batch's. Replayed RNG
repeats dropout exactly only if both passes run the same kernels: on GPUs, attention dropout (model.dropout
> 0) may take a different fused-attention kernel with and without grad; the shipped configs use 0.
"""
from __future__ import annotations

import torch

from mmpt.losses import contrastive_terms, moe_terms
from mmpt.losses.accumulate import RngReplay
from mmpt.losses.captioning import caption_loss

PAIR_PARAMS = ("logit_scale", "logit_bias")  # per-pair outputs of the model the contrastive losses take


def _encode_all(engine, batches: list, drop_token: dict | None) -> tuple[RngReplay, dict, dict, list]:
    rng, embs, tokens, pair_values = RngReplay(), {}, [], {}
    with torch.no_grad():
        for batch in batches:
            rng.record()
            out = engine(batch, encode_only=True, drop_token=drop_token)
            for m, e in out["emb"].items():
                embs.setdefault(m, []).append(e)
            pair_values = {k: out[k] for k in PAIR_PARAMS if k in out}  # the same for every micro-batch
            tokens.append(out["caption_tokens"])
    return rng, {m: torch.cat(e) for m, e in embs.items()}, pair_values, tokens


def _cached_grads(embs: dict, pair_values: dict, loss_cfg, group) -> tuple[dict, dict, dict]:
    """The contrastive losses on the accumulated embeddings; their gradients to embeddings and to the
    per-pair temperatures (and biases)."""
    embs = {m: e.detach().requires_grad_() for m, e in embs.items()}
    leaves = {k: {p: v.detach().requires_grad_() for p, v in d.items()} for k, d in pair_values.items()}
    with torch.enable_grad():
        total, losses = contrastive_terms(embs, leaves["logit_scale"], loss_cfg, group, leaves.get("logit_bias"))
    if not torch.is_tensor(total):  # a task with one modality has no contrastive pair
        return {}, {}, {}
    total.backward()
    losses = {k: v.detach() for k, v in losses.items()}
    losses["contrastive"] = total.detach()
    pair_grads = {k: {p: v.grad for p, v in d.items() if v.grad is not None} for k, d in leaves.items()}
    return {m: e.grad for m, e in embs.items()}, pair_grads, losses


def surrogate(out: dict, cached: dict, loss_cfg) -> dict:
    """Called inside the engine's forward (TrainModule) for one micro-batch of an accumulated step: a scalar
    whose gradient is this micro-batch's share of the accumulated objective's gradient."""
    total = sum((out["emb"][m].float() * g).sum() for m, g in cached["emb_grad"].items())
    for key, grads in cached["pair_grad"].items():
        total = total + sum(out[key][p] * g for p, g in grads.items())
    metrics = {}
    if "caption_logits" in out and cached["caption_share"] > 0:
        metrics["caption_loss"] = caption_loss(out["caption_logits"], out["caption_targets"])
        total = total + loss_cfg.caption_weight * cached["caption_share"] * metrics["caption_loss"]
    aux = moe_terms(out.get("aux", {}), metrics)
    total = total + aux / cached["micro_batches"]
    return {"loss": total, **metrics}


def accumulated_step(engine, batches: list, loss_cfg, group=None, weight: float = 1.0,
                     drop_token: dict | None = None) -> dict:
    """Backward and step for every micro-batch (DeepSpeed steps the optimizer at the last one, its
    gradient_accumulation_steps being len(batches)); the task's loss scaled by `weight`. Returns the step's
    (unscaled) metrics as detached tensors."""
    from mmpt.train.engine import clear_grad_partitions  # engine.py imports this module

    rng, embs, pair_values, tokens = _encode_all(engine, batches, drop_token)
    emb_grad, pair_grad, losses = _cached_grads(embs, pair_values, loss_cfg, group)
    sizes = [next(iter(b.values())).size(0) for b in batches]
    all_tokens, start, parts = sum(tokens), 0, []
    for i, (batch, n) in enumerate(zip(batches, sizes, strict=True)):
        cached = {"emb_grad": {m: g[start:start + n] for m, g in emb_grad.items()},
                  "pair_grad": pair_grad if i == 0 else {},  # temperatures and biases: once
                  "caption_share": tokens[i] / all_tokens if all_tokens else 0.0,
                  "micro_batches": len(batches)}
        rng.replay(i)
        out = engine(batch, cached=cached, drop_token=drop_token)
        # The surrogate already carries this micro-batch's share; DeepSpeed divides by its accumulation
        # steps (k), so hand it k times the surrogate. (scale_wrt_gas=False is not enough: DeepSpeed's hooks
        # on the forward's outputs still divide when the loss handed to backward is one of those outputs.)
        engine.backward(len(batches) * weight * out["loss"])
        engine.step()
        parts.append({k: v.detach() for k, v in out.items() if k != "loss"})
        start += n
    clear_grad_partitions(engine)
    return _step_metrics(losses, parts, tokens, loss_cfg)


def _step_metrics(losses: dict, parts: list, tokens: list, loss_cfg) -> dict:
    total = losses.pop("contrastive", torch.zeros(()))
    for key in parts[0]:
        if key.startswith("tokens/"):  # a count: the step ran all micro-batches' tokens
            value = torch.stack([p[key] for p in parts]).sum()
        elif key == "caption_loss":
            value = sum(p[key] * t for p, t in zip(parts, tokens, strict=True)) / max(sum(tokens), 1)
            total = total + loss_cfg.caption_weight * value
        else:
            value = torch.stack([p[key] for p in parts]).mean()
        losses[key] = value
    if "moe_loss" in losses:
        total = total + losses["moe_loss"]
    losses["loss"] = total
    return losses
