"""Model accounting: parameters (total, active per token) and forward FLOPs per sample for each modality.

    mmpt model info imp_moe_b16 --json
"""
from __future__ import annotations

import copy

import torch

from mmpt import modality as registry
from mmpt.model.moe import is_moe_layer


def experts_per_token(moe) -> float:
    return moe.capacity_factor if moe.router == "expert_choice" else float(moe.top_k)


def encoder_flops(cfg, modality: str, stem=None) -> int:
    """Forward FLOPs (2 x multiply-adds) of stem + trunk + pooling head for one sample; attention included.
    `stem`: the built stem module, when it counts its own FLOPs per token (convolutional stems)."""
    spec = registry.get(modality)
    n, d = spec.tokens(cfg), cfg.width
    hidden = int(d * cfg.mlp_ratio)
    per_token = getattr(stem, "flops_per_token", None)
    flops = n * per_token() if per_token is not None else 2 * n * spec.inputs_per_token(cfg) * d
    for layer in range(cfg.depth):
        moe_layer = is_moe_layer(cfg.moe, layer, cfg.depth)
        k = experts_per_token(cfg.moe) if moe_layer else 1.0
        router = 2 * n * d * cfg.moe.num_experts if moe_layer else 0
        flops += 2 * n * 4 * d * d + 2 * 2 * n * n * d + int(k * 2 * n * 2 * d * hidden) + router
    flops += 2 * (n * 2 * d * d + 2 * n * d + 2 * d * d) + 2 * d * cfg.embed_dim  # attentional pooling + projection
    return flops


def stem_of(model, modality: str):
    stem = model.plan[modality][0]
    return model.stems[stem] if stem in model.stems else None


def model_info(cfg) -> dict:
    """cfg: the run Config. The model is built on the meta device: no memory, no distributed setup."""
    from mmpt.model import build_model

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.moe.backend = "native"  # same parameters; the deepspeed backend needs a process group
    with torch.device("meta"):
        model = build_model(model_cfg)
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
    from mmpt.data.budget import loader_memory

    return {**model_info(cfg), "loader_memory": loader_memory(cfg)}
