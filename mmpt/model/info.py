"""Model accounting: parameters (total, active per token) and forward FLOPs per sample for each modality.

    mmpt model info imp_moe_b16 --json

FLOPs are 2 x multiply-adds of the matmuls and convolutions (norms, activations and softmax left out), the
count torch's FlopCounterMode makes. The pieces below (trunk, pooling head, caption decoder) take the shapes a
call really runs, so the same formulas serve the nominal per-sample figures here and each training step's
count (mmpt.train.throughput).
"""
from __future__ import annotations

import copy

import torch

from mmpt import modality as registry
from mmpt.data.budget import loader_memory
from mmpt.model.model import build_model
from mmpt.model.moe import is_moe_layer
from mmpt.model.routing import capacity


def experts_per_token(moe) -> float:
    return moe.capacity_factor if moe.router == "expert_choice" else float(moe.top_k)


def moe_slots(moe, routed: int) -> int:
    """Expert token computations of one training call of an MoE layer over `routed` tokens: expert choice fills
    each expert's C = ceil(S / E x capacity_factor) slots (mmpt.model.routing); token choice runs k experts per
    token (the active ones; what a capacity limit drops is not subtracted)."""
    if moe.router == "expert_choice":
        return moe.num_experts * min(routed, capacity(routed, moe.num_experts, moe.capacity_factor))
    return moe.top_k * routed


def self_attention_flops(width: int, batch: int, length: int) -> int:
    """q, kv and out projections plus scores and weighted sum, over `batch` sequences of `length` positions
    (padding included: the kernels run it)."""
    return batch * (8 * length * width * width + 4 * length * length * width)


def trunk_flops(cfg, batch: int, length: int, routed: int, slots: float | None = None) -> float:
    """The shared trunk on `batch` sequences of `length` positions. MoE layers route only the `routed` real
    tokens (mmpt.model.routing.valid_tokens) and run `slots` expert computations (default: experts_per_token
    x routed, the per-sample average)."""
    d, hidden, moe = cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.moe
    flops = 0.0
    for layer in range(cfg.depth):
        flops += self_attention_flops(d, batch, length)
        if is_moe_layer(moe, layer, cfg.depth):
            run = experts_per_token(moe) * routed if slots is None else slots
            flops += 2 * routed * d * moe.num_experts + 4 * run * d * hidden  # router + experts' two matmuls
        else:
            flops += 4 * batch * length * d * hidden
    return flops


def pooling_flops(cfg, batch: int, length: int) -> int:
    """Attentional pooling (one query over `length` positions) and the projection to the embedding."""
    d = cfg.width
    return batch * (4 * length * d * d + 4 * length * d + 4 * d * d + 2 * d * cfg.embed_dim)


def decoder_flops(cfg, batch: int, length: int, context: int, targets: int) -> int:
    """The CoCa caption decoder under teacher forcing: `batch` captions of `length` tokens (it runs length - 1
    positions), cross layers attending to `context` encoder positions each, the tied LM head on the `targets`
    scored positions (up to each EOT)."""
    d, hidden, n = cfg.width, int(cfg.width * cfg.mlp_ratio), length - 1
    layer = self_attention_flops(d, batch, n) + 4 * batch * n * d * hidden
    cross = batch * (4 * n * d * d + 4 * context * d * d + 4 * n * context * d)
    return (cfg.decoder_layers * layer + cfg.decoder_cross_layers * (layer + cross)
            + 2 * targets * d * cfg.vocab_size)


def stem_flops(cfg, modality: str, stem, patches: int) -> int:
    """The stem's projection of `patches` patches (before DropToken keeps some). `stem`: the built stem, when
    it counts its own FLOPs per patch (convolutional and linear patch stems)."""
    per_token = getattr(stem, "flops_per_token", None)
    return patches * per_token() if per_token is not None else 2 * patches * registry.get(modality).inputs_per_token(
        cfg) * cfg.width


def encoder_flops(cfg, modality: str, stem=None) -> int:
    """Forward FLOPs of stem + trunk + pooling head for one sample at the config's nominal size; attention
    included. `stem`: the built stem module, when it counts its own FLOPs per token (convolutional stems)."""
    n = registry.get(modality).tokens(cfg)
    return int(stem_flops(cfg, modality, stem, n) + trunk_flops(cfg, 1, n, n) + pooling_flops(cfg, 1, n))


def stem_of(model, modality: str):
    stem = model.plan[modality][0]
    return model.stems[stem] if stem in model.stems else None


def meta_model(model_cfg):
    """The model built on the meta device (no memory, no distributed setup, the CPU RNG untouched): its
    structure for accounting."""
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.moe.backend = "native"  # same parameters; the deepspeed backend needs a process group
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(model_cfg)


def model_info(cfg) -> dict:
    """cfg: the run Config."""
    model_cfg = cfg.model
    model = meta_model(model_cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = count(model)
    decoder = count(model.decoder) if model.decoder is not None else 0
    inactive = 0
    for layer, block in enumerate(model.trunk.blocks):
        if is_moe_layer(model_cfg.moe, layer, model_cfg.depth):
            experts = count(block.ffn) - count(block.ffn.router)
            inactive += experts * (1 - experts_per_token(model_cfg.moe) / model_cfg.moe.num_experts)
    return {
        "name": cfg.name, "parameters": total, "encoder_parameters": total - decoder, "decoder_parameters": decoder,
        "active_parameters_per_token": int(round(total - decoder - inactive)),
        "moe_layers": [i for i in range(model_cfg.depth) if is_moe_layer(model_cfg.moe, i, model_cfg.depth)],
        "experts": model_cfg.moe.num_experts,
        "tokens_per_sample": {m: registry.get(m).tokens(model_cfg) for m in model_cfg.modalities},
        "gflops_per_sample": {m: encoder_flops(model_cfg, m, stem_of(model, m)) / 1e9 for m in model_cfg.modalities},
    }


def run_info(cfg) -> dict:
    """model_info plus what the loaders hold in shared memory (mmpt.data.budget)."""
    return {**model_info(cfg), "loader_memory": loader_memory(cfg)}
