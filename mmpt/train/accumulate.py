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
per micro-batch, as in any gradient accumulation. Activation memory is one micro-batch's. This module runs
the passes through the engine; what they compute (the cached gradients, the surrogate, the step's report)
comes from the objective's own modules, mmpt.losses.accumulate and mmpt.losses.objective. Replayed RNG repeats
dropout exactly only if both passes run the same kernels: on GPUs, attention dropout (model.dropout
> 0) may take a different fused-attention kernel with and without grad; the shipped configs use 0.
"""
from __future__ import annotations

import torch

from mmpt.losses.accumulate import RngReplay, cached_gradients, micro_batch_shares
from mmpt.losses.objective import PAIR_PARAMS, accumulated_report
from mmpt.train.engine import clear_grad_partitions


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


def accumulated_step(engine, batches: list, loss_cfg, group=None, weight: float = 1.0,
                     drop_token: dict | None = None) -> dict:
    """Backward and step for every micro-batch (DeepSpeed steps the optimizer at the last one, its
    gradient_accumulation_steps being len(batches)); the task's loss scaled by `weight`. Returns the step's
    (unscaled) metrics as detached tensors."""
    rng, embs, pair_values, tokens = _encode_all(engine, batches, drop_token)
    emb_grad, pair_grad, contrastive = cached_gradients(embs, pair_values, loss_cfg, group)
    sizes = [next(iter(b.values())).size(0) for b in batches]
    shares = micro_batch_shares(emb_grad, pair_grad, sizes, tokens)
    parts = []
    for i, (batch, cached) in enumerate(zip(batches, shares, strict=True)):
        rng.replay(i)
        out = engine(batch, cached=cached, drop_token=drop_token)
        # The surrogate already carries this micro-batch's share; DeepSpeed divides by its accumulation
        # steps (k), so hand it k times the surrogate. (scale_wrt_gas=False is not enough: DeepSpeed's hooks
        # on the forward's outputs still divide when the loss handed to backward is one of those outputs.)
        engine.backward(len(batches) * weight * out["loss"])
        engine.step()
        parts.append({k: v.detach() for k, v in out.items() if k != "loss"})
    clear_grad_partitions(engine)
    # Token counts (TrainModule's "tokens/<modality>"): the step ran every micro-batch's tokens.
    counts = {k: torch.stack([part.pop(k) for part in parts]).sum() for k in list(parts[0]) if k.startswith("tokens/")}
    return {**accumulated_report(contrastive, parts, [s["caption_share"] for s in shares]), **counts}
