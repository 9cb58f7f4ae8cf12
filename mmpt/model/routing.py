"""Mixture-of-Experts routing: top-k token choice (capacity, dropping or dropless) and expert choice, plus the
auxiliary losses and per-call metrics. Pure functions of router logits; the layers live in `mmpt.model.moe`.

Token choice follows Switch/GShard and DeepSpeed: capacity C = ceil(S / E * capacity_factor) per expert (k times
that for k choices), first choices of all tokens claim slots before second choices, in token order.
Expert choice (Zhou et al. 2022, encoder only): each expert takes its top-C tokens by router probability.

At eval (`eval_routing`, what the layers call when `not self.training`) routing is per token and dropless, so a
token's output never depends on the other tokens in the batch — zero-shot and retrieval results are the same
whatever the eval batch size, batch composition or number of ranks:
- token choice: top-k as in training, but no capacity (C = the busiest expert's load): nothing is dropped,
  whatever `drop_tokens` and `eval_capacity_factor` say;
- expert choice: an expert's top-C pick ranks a token against the whole batch, so eval falls back to per-token
  top-k token choice with k = max(1, round(eval_capacity_factor)) (at most E): in expert choice a token gets
  `capacity_factor` experts on average, and its gates stay the raw router probabilities, as expert choice
  trains them (not renormalised over the k choices).
Training routing is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    token: torch.Tensor  # (A,) token index of each assignment
    expert: torch.Tensor  # (A,) expert index
    gate: torch.Tensor  # (A,) combine weight (differentiable)
    dropped: torch.Tensor  # () assignments that lost their slot to capacity
    capacity: int


def capacity(tokens: int, experts: int, factor: float, k: int = 1) -> int:
    return max(1, math.ceil(tokens / experts * factor * k))


def top_k_routing(logits: torch.Tensor, k: int, capacity_factor: float, drop_tokens: bool = True,
                  renormalize: bool = True) -> Routing:
    """logits (S, E) fp32 of valid tokens only. Gates of the k choices are renormalised to sum to 1 (k > 1)
    unless `renormalize` is False (they stay router probabilities)."""
    s, e = logits.shape
    probs = logits.softmax(-1)
    top_p, top_e = probs.topk(k, dim=-1)  # (S, k)
    if k > 1 and renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).eps)
    # Choice-major order: every token's first choice is placed before any second choice.
    expert = top_e.t().reshape(-1)
    token = torch.arange(s, device=logits.device).repeat(k)
    gate = top_p.t().reshape(-1)
    one_hot = F.one_hot(expert, e)
    position = (one_hot.cumsum(0) - 1).gather(1, expert[:, None])[:, 0]  # slot index within the expert
    cap = capacity(s, e, capacity_factor, k) if drop_tokens else max(1, int(one_hot.sum(0).max()))
    keep = position < cap
    return Routing(token[keep], expert[keep], gate[keep], (~keep).sum(), cap)


def expert_choice_routing(logits: torch.Tensor, capacity_factor: float) -> Routing:
    """Each expert picks exactly C = ceil(S / E * capacity_factor) tokens (C <= S)."""
    s, e = logits.shape
    probs = logits.softmax(-1)
    cap = min(s, capacity(s, e, capacity_factor))
    gate, token = probs.t().topk(cap, dim=-1)  # (E, C)
    expert = torch.arange(e, device=logits.device)[:, None].expand(e, cap)
    picked = torch.zeros(s, dtype=torch.bool, device=logits.device)
    picked[token.reshape(-1)] = True
    return Routing(token.reshape(-1), expert.reshape(-1), gate.reshape(-1), (~picked).sum(), cap)


def eval_routing(logits: torch.Tensor, router: str, k: int, eval_capacity_factor: float) -> Routing:
    """Per-token, dropless routing for eval (see the module docstring): each token's experts and gates are a
    function of its own logits only."""
    if router == "expert_choice":
        per_token = min(logits.size(1), max(1, round(eval_capacity_factor)))
        return top_k_routing(logits, per_token, eval_capacity_factor, drop_tokens=False, renormalize=False)
    return top_k_routing(logits, k, eval_capacity_factor, drop_tokens=False)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * p.clamp_min(1e-9).log()).sum(dim)


def aux_losses(logits: torch.Tensor, routing: Routing, cfg) -> dict:
    """Weighted auxiliary losses (their sum is `moe_loss`) and detached metrics for one call (one modality)."""
    s, e = logits.shape
    probs = logits.softmax(-1)
    top1 = F.one_hot(probs.argmax(-1), e).float()
    balance = e * (top1.mean(0) * probs.mean(0)).sum()  # Switch/GShard: 1.0 when perfectly balanced
    z = logits.logsumexp(-1).pow(2).mean()  # ST-MoE router z-loss
    local = entropy(probs).mean()  # LIMoE: low per-token entropy = confident routing
    glob = entropy(probs.mean(0))  # LIMoE: high entropy of the average = many experts used
    threshold = cfg.global_entropy_threshold if cfg.global_entropy_threshold is not None else math.log(e) / 2
    loss = (cfg.balance_weight * balance + cfg.z_loss_weight * z + cfg.local_entropy_weight * local
            + cfg.global_entropy_weight * F.relu(threshold - glob))
    load = torch.bincount(routing.expert, minlength=e).float() / max(1, routing.expert.numel())
    assigned = routing.expert.numel() + routing.dropped
    return {"moe_loss": loss,
            "balance": balance.detach(), "z_loss": z.detach(), "router_entropy": local.detach(),
            "global_entropy": glob.detach(), "dropped_rate": (routing.dropped / max(1, int(assigned))).detach().float(),
            "expert_load": load.detach(), "tokens": torch.tensor(float(s))}


def valid_tokens(x: torch.Tensor, key_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, N, D) -> (S, D) of real tokens and the flat index of each (None when all are real)."""
    flat = x.reshape(-1, x.size(-1))
    if key_mask is None or bool(key_mask.all()):
        return flat, None
    index = key_mask.reshape(-1).nonzero()[:, 0]
    return flat[index], index
