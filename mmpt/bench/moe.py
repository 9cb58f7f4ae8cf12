"""MoE layer cost against a dense FFN with the same active parameters per token, both backends, one run.

    mmpt bench moe --json

Forward + backward of one FFN layer on S tokens of width D: dense MLP(D, 4D) vs 8 experts of MLP(D, 4D) with
top-1 routing (capacity factor 1.25), native and DeepSpeed backends. Memory is the bytes autograd saves for
backward (activations), measured with saved-tensor hooks. Prints one JSON object; key `moe_over_dense`
is the native backend's time ratio (target <= 1.3 on CPU).
"""
from __future__ import annotations

import torch

from mmpt.bench.common import median_ms
from mmpt.config import MoEConfig
from mmpt.distributed import init_distributed, shutdown_distributed
from mmpt.model.moe import DeepSpeedMoE, NativeMoE, copy_native_to_deepspeed
from mmpt.model.trunk import MLP


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def timed(layer, x: torch.Tensor, repeats: int) -> dict:
    def step():
        out = layer(x)
        y = out[0] if isinstance(out, tuple) else out
        loss = y.float().square().mean() + (out[1]["moe_loss"] if isinstance(out, tuple) else 0.0)
        loss.backward()

    for _ in range(2):
        step()
    ms = median_ms(step, repeats, before=lambda: layer.zero_grad(set_to_none=True))
    return {"ms": ms, "tokens_per_s": x.shape[0] * x.shape[1] / (ms / 1000),
            "saved_activation_mb": saved_bytes(lambda: layer(x)) / 2**20,
            "parameters": sum(p.numel() for p in layer.parameters())}


def run(tokens: int = 4096, width: int = 256, experts: int = 8, repeats: int = 7) -> dict:

    init_distributed()  # the DeepSpeed layer needs a process group; one local rank is enough
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=1, capacity_factor=1.25, backend="native")
    x = torch.randn(tokens // 256, 256, width, requires_grad=False)
    dense = MLP(width, 4 * width)
    native = NativeMoE(cfg, width, 4 * width)
    ds = DeepSpeedMoE(MoEConfig(num_experts=experts, top_k=1, capacity_factor=1.25, backend="deepspeed"),
                      width, 4 * width)
    copy_native_to_deepspeed(native, ds)
    result = {"bench": "moe", "tokens": tokens, "width": width, "hidden": 4 * width, "experts": experts, "top_k": 1,
              "capacity_factor": 1.25, "torch_threads": torch.get_num_threads(),
              "dense": timed(dense, x, repeats), "native": timed(native, x, repeats),
              "deepspeed": timed(ds, x, repeats)}
    for name in ("native", "deepspeed"):
        result[name]["over_dense"] = result[name]["ms"] / result["dense"]["ms"]
    result["moe_over_dense"] = result["native"]["over_dense"]
    result["target"] = {"moe_over_dense": 1.3}
    shutdown_distributed()
    return result


def add_arguments(parser) -> None:
    """No flags: the layer sizes are the bench's definition."""


def main(args) -> dict:
    return run()
