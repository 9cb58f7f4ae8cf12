"""Mixture-of-Experts FFN layers behind one config key, `model.moe.backend`:

- `native`: experts as batched weights (E, D, H), index dispatch. Runs under every ZeRO stage. The batched
  weights are touched whole on every call (`unbind`), whichever experts get tokens, so ZeRO-3's per-parameter
  gather and reduce hooks fire identically on every rank; no `set_z3_leaf_modules` is needed (and the leaf
  flag breaks when one layer runs twice in a backward, as the shared trunk does for two modalities).
- `deepspeed`: `deepspeed.moe.layer.MoE` with expert parallelism (`model.moe.ep_size`), ZeRO <= 2.

Both return (y, aux): the same routing semantics, the same auxiliary losses (mmpt.model.routing) and metrics.
At eval the native layer routes per token and dropless (`mmpt.model.routing.eval_routing`: expert choice falls
back to top-k token choice), so a token's output does not depend on its batch; the deepspeed layer keeps
DeepSpeed's own eval gating (capacity from `eval_capacity_factor`, dropping when `drop_tokens`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.model.routing import aux_losses, eval_routing, expert_choice_routing, top_k_routing, valid_tokens
from mmpt.model.trunk import MLP


def route(logits: torch.Tensor, cfg, training: bool, per_token_eval: bool = True):
    """The routing of one call. per_token_eval=False: eval as DeepSpeed's gate does it (its metrics say so)."""
    if not training and per_token_eval:
        return eval_routing(logits, cfg.router, cfg.top_k, cfg.eval_capacity_factor)
    factor = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if cfg.router == "expert_choice":
        return expert_choice_routing(logits, factor)
    return top_k_routing(logits, cfg.top_k, factor, cfg.drop_tokens)


class NativeMoE(nn.Module):
    def __init__(self, cfg, width: int, hidden: int):
        super().__init__()
        self.cfg, e = cfg, cfg.num_experts
        self.router = nn.Linear(width, e, bias=False)
        bound1, bound2 = 1 / math.sqrt(width), 1 / math.sqrt(hidden)  # nn.Linear's default init
        self.w1 = nn.Parameter(torch.empty(e, width, hidden).uniform_(-bound1, bound1))
        self.b1 = nn.Parameter(torch.empty(e, hidden).uniform_(-bound1, bound1))
        self.w2 = nn.Parameter(torch.empty(e, hidden, width).uniform_(-bound2, bound2))
        self.b2 = nn.Parameter(torch.empty(e, width).uniform_(-bound2, bound2))

    def experts(self, tokens: torch.Tensor, routing) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        order = routing.expert.argsort(stable=True)
        tok, gate = routing.token[order], routing.gate[order]
        counts = torch.bincount(routing.expert, minlength=self.cfg.num_experts).tolist()
        # unbind, not self.w1[e]: indexing's backward would allocate and zero-fill a full (E, D, H) gradient per
        # expert; unbind's backward stacks the expert gradients once.
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tok[start:start + n]
                h = F.gelu(torch.addmm(b1[e], tokens[idx], w1[e]))
                out.index_add_(0, idx, torch.addmm(b2[e], h, w2[e]) * gate[start:start + n, None].to(h.dtype))
                start += n
        return out

    # Eager under train.compile (mmpt.train.engine.compile_engine marks it): routing sizes each expert's work from
    # the data (bincount, argsort), which would recompile at every new split of tokens.
    def forward(self, x: torch.Tensor, key_mask=None) -> tuple[torch.Tensor, dict]:
        tokens, index = valid_tokens(x, key_mask)
        logits = F.linear(tokens.float(), self.router.weight.float())
        routing = route(logits, self.cfg, self.training)
        out = self.experts(tokens, routing)
        if index is not None:
            full = torch.zeros(x.numel() // x.size(-1), x.size(-1), dtype=out.dtype, device=out.device)
            out = full.index_copy(0, index, out)
        return out.view_as(x), aux_losses(logits, routing, self.cfg)


class DeepSpeedMoE(nn.Module):
    """deepspeed.moe.layer.MoE (expert parallel). Needs torch.distributed initialised."""

    def __init__(self, cfg, width: int, hidden: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        if cfg.router != "token_choice":
            raise ValueError(f"model.moe.router={cfg.router}: the deepspeed backend only does token choice")
        self.cfg = cfg
        # No random token selection / noisy gates: routing must equal the native backend's.
        self.moe = MoE(hidden_size=width, expert=MLP(width, hidden), num_experts=cfg.num_experts, ep_size=cfg.ep_size,
                       k=cfg.top_k, capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=0, drop_tokens=cfg.drop_tokens, use_rts=False, noisy_gate_policy=None,
                       top2_2nd_expert_sampling=False)

    @property
    def router_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def forward(self, x: torch.Tensor, key_mask=None) -> tuple[torch.Tensor, dict]:
        if self.moe.deepspeed_moe.ep_group is None:  # no engine set the expert groups up: do it once, here
            self.moe.set_deepspeed_parallelism()
        # DeepSpeed's top-1 gate masks padding with `used_token`; int64 like its one-hot mask, since a float mask
        # turns the dropless capacity into a float tensor that torch.topk rejects.
        used = key_mask.reshape(-1).long() if key_mask is not None and self.cfg.top_k == 1 else None
        y, _, _ = self.moe(x, used)
        tokens, _ = valid_tokens(x, key_mask)
        logits = F.linear(tokens.float(), self.router_weight.float())
        # DeepSpeed's own l_aux is the same Switch balance term; ours is used so both backends train alike.
        return y, aux_losses(logits, route(logits, self.cfg, self.training, per_token_eval=False), self.cfg)


def make_ffn(model_cfg, layer: int) -> nn.Module:
    """The FFN of trunk layer `layer`: MoE where `model.moe` places it, dense elsewhere."""
    moe, width = model_cfg.moe, model_cfg.width
    hidden = int(width * model_cfg.mlp_ratio)
    if not is_moe_layer(moe, layer, model_cfg.depth):
        return MLP(width, hidden, model_cfg.dropout)
    return {"native": NativeMoE, "deepspeed": DeepSpeedMoE}[moe.backend](moe, width, hidden)


def is_moe_layer(moe, layer: int, depth: int) -> bool:
    if moe.num_experts <= 1:
        return False
    if moe.last:
        return layer >= depth - moe.last
    if moe.every:
        return (layer + 1) % moe.every == 0
    return True


def copy_native_to_deepspeed(native: NativeMoE, ds: DeepSpeedMoE, expert_offset: int = 0) -> None:
    """Load a native layer's weights into a DeepSpeed layer holding experts [offset, offset + local)."""
    with torch.no_grad():
        ds.router_weight.copy_(native.router.weight)
        for i, expert in enumerate(ds.moe.deepspeed_moe.experts.deepspeed_experts):
            e = expert_offset + i
            expert.fc1.weight.copy_(native.w1[e].t())
            expert.fc1.bias.copy_(native.b1[e])
            expert.fc2.weight.copy_(native.w2[e].t())
            expert.fc2.bias.copy_(native.b2[e])
