"""Throughput metrics of a log window: tokens/s per modality and model FLOPs utilisation (MFU).

Tokens are the encoder tokens each step really ran (after DropToken, at each task's own resolution), summed over
ranks. Training FLOPs per token are 3x the encoder forward FLOPs per token of `mmpt model info` (forward and
backward; the caption decoder is not counted, so MFU is a lower bound). MFU = those FLOPs per second / (the
device's peak x ranks). The peak is `train.peak_tflops` when set, else measured once by a matmul probe in the
engine's dtype (on a GPU that is the attainable dense matmul rate, a little under the datasheet's).
"""
from __future__ import annotations

import time

import torch

TOKEN_KEY = "tokens/"


def flops_per_token(cfg) -> dict:
    """modality -> training FLOPs per encoder token (3 x forward, from mmpt model info)."""
    from mmpt.model.info import model_info

    with torch.random.fork_rng(devices=[]):  # the model is built on the meta device; keep the CPU RNG anyway
        info = model_info(cfg)
    return {m: 3e9 * g / max(1, info["tokens_per_sample"][m]) for m, g in info["gflops_per_sample"].items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls on this device in this dtype (n = 4096 on a GPU, 1024 on a CPU)."""
    n = 4096 if device.type == "cuda" else 1024
    # A generator of its own: drawing from the global one would shift the training RNG (dropout, DropToken) of
    # a resumed run against a straight one.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up (kernel selection)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
        if device.type == "cuda" and runs % 10:
            continue
        sync()
    sync()
    return 2 * n ** 3 * runs / (time.perf_counter() - start)


def peak_flops(cfg, engine) -> float:
    """Per device: train.peak_tflops, else the matmul probe in the engine's dtype."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    from mmpt.train.engine import half_dtype

    return matmul_peak(engine.device, half_dtype(engine) or torch.float32)


def window_throughput(sums: dict, seconds: float, world: int, per_token: dict, peak: float) -> dict:
    """sums: (task, key) -> summed step values of one rank (mmpt.train.loop's running sums); every rank ran
    the same tasks at the same batch size, so tokens scale with the world size."""
    tokens: dict = {}
    for (_, key), value in sums.items():
        if key.startswith(TOKEN_KEY):
            m = key[len(TOKEN_KEY):]
            tokens[m] = tokens.get(m, 0.0) + float(value) * world
    out = {f"tokens_per_s/{m}": n / seconds for m, n in tokens.items()}
    flops = sum(per_token.get(m, 0.0) * n for m, n in tokens.items())
    out["model_tflops_per_s"] = flops / seconds / 1e12
    out["mfu"] = flops / seconds / (peak * world) if peak else 0.0
    return out
