"""Throughput metrics of a log window: tokens/s per modality and model FLOPs utilisation (MFU).

Tokens are the encoder tokens each step really ran (after DropToken, at each task's own resolution), summed over
ranks. Model FLOPs are counted per step from the shapes its batches ran (`StepFlops`): each modality at its real
sequence length (dense layers in proportion to tokens, attention to length squared per sequence), text at its
full padded length (the trunk runs every position), MoE layers at the expert computations they ran, the caption
decoder when the task runs it; training = 3 x forward. Activation recomputation (gradient checkpointing, the
encode-only pass of accumulated steps) and the contrastive logits are not model FLOPs and are left out.

    mfu        model FLOP/s / (the device's datasheet peak x ranks): `train.peak_tflops`, else `PEAKS` for the
               engine's dtype; not logged where neither gives one (a CPU, an unlisted device)
    mfu_probe  the same over a matmul rate measured once in the engine's dtype (attainable, not the datasheet's)
"""
from __future__ import annotations

import math
import time

import torch

from mmpt import modality as registry
from mmpt.model.info import decoder_flops, meta_model, moe_slots, pooling_flops, stem_flops, trunk_flops
from mmpt.model.stems import valid_mask

TOKEN_KEY = "tokens/"

# Dense peaks in TFLOP/s per torch device: (parts of the device's name, bf16, fp16, tf32, fp32); None: no such
# units. Sources: the vendors' datasheets. NVIDIA: A100 (PCIe and SXM), H100 (SXM, PCIe, NVL), H200 (SXM, NVL),
# L40S, L40, L4, A10, V100/V100S, T4; NVIDIA prints tensor figures with 2:4 sparsity (marked *), and these are
# half of those. AMD Instinct: MI300X, MI325X, MI250X, MI250, MI210 (fp32: the matrix-core rate); an MI250(X) is
# two GCDs, each its own torch device, so half the card's figures. The A10G (AWS EC2 G5) has no datasheet:
# 80 SMs at 1.71 GHz with half-rate fp32-accumulate tensor cores, the 70 / 35 TFLOP/s AWS and NVIDIA quote.
# First match wins: more specific names first. `train.peak_tflops` overrides the table.
PEAKS: tuple = (
    (("h100", "nvl"), 835.5, 835.5, 417.5, 60.0),
    (("h100", "pcie"), 756.5, 756.5, 378.0, 51.0),
    (("h100",), 989.5, 989.5, 494.5, 67.0),
    (("h200", "nvl"), 835.5, 835.5, 417.5, 60.0),
    (("h200",), 989.5, 989.5, 494.5, 67.0),  # SXM; GH200's Hopper GPU has the same figures
    (("a100",), 312.0, 312.0, 156.0, 19.5),
    (("l40s",), 362.05, 362.05, 183.0, 91.6),
    (("l40",), 181.05, 181.05, 90.5, 90.5),
    (("l4",), 121.0, 121.0, 60.0, 30.3),
    (("a10g",), 70.0, 70.0, 35.0, 35.0),
    (("a10",), 125.0, 125.0, 62.5, 31.2),
    (("v100s",), None, 130.0, None, 16.4),  # Volta: fp16 tensor cores only
    (("v100", "pcie"), None, 112.0, None, 14.0),
    (("v100",), None, 125.0, None, 15.7),
    (("tesla t4",), None, 65.0, None, 8.1),
    (("mi300x",), 1307.4, 1307.4, 653.7, 163.4),
    (("mi325x",), 1307.4, 1307.4, 653.7, 163.4),
    (("mi250x",), 191.5, 191.5, None, 47.85),
    (("mi250",), 181.05, 181.05, None, 45.25),
    (("mi210",), 181.0, 181.0, None, 45.3),
)
_COLUMN = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 4}


def datasheet_peak(name: str, dtype: torch.dtype, fp32_precision: str = "highest") -> float | None:
    """FLOP/s of the device named `name` (torch.cuda.get_device_name) in `dtype` from PEAKS; float32 takes the
    TF32 figure where torch lets matmuls use TF32 (torch.get_float32_matmul_precision() != "highest")."""
    lowered = name.lower()
    for row in PEAKS:
        if all(part in lowered for part in row[0]):
            value = row[_COLUMN[dtype]] if dtype in _COLUMN else None
            if dtype == torch.float32 and fp32_precision != "highest" and row[3] is not None:
                value = row[3]
            return None if value is None else value * 1e12
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(cfg, device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Per device: (FLOP/s, where it comes from): train.peak_tflops, else the datasheet table; (None, why) when
    neither gives one."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12, f"train.peak_tflops={cfg.train.peak_tflops:g} per device"
    name = device_name(device)
    peak = datasheet_peak(name, dtype, torch.get_float32_matmul_precision())
    if peak is None:
        return None, (f"no datasheet peak for {name} in {dtype} (mmpt.train.throughput.PEAKS): mfu is not logged; "
                      "set train.peak_tflops to log it")
    return peak, f"{name} datasheet peak {peak / 1e12:g} TFLOP/s in {dtype} (dense)"


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


class StepFlops:
    """Model FLOPs of training steps, from the shapes of the loader's batches (on the host: no device sync)."""

    def __init__(self, model_cfg):
        model = meta_model(model_cfg)  # the stems' patch sizes and DropToken rates, the decoder's presence
        self.cfg, self.plan, self.stems, self.decoder = model.cfg, model.plan, model.stems, model.decoder is not None

    def __call__(self, batches: list, modalities: list, drop_token: dict | None = None) -> float:
        """One optimizer step over its micro-batches: 3 x forward (backward = 2 x forward)."""
        return 3.0 * sum(self.forward(batch, modalities, drop_token) for batch in batches)

    def run(self, modality: str, x: torch.Tensor, drop: float | None) -> tuple[int, int, int, int]:
        """(sequences, positions per sequence, patches the stem projects, real tokens) of one modality's batch
        as the model runs it in training."""
        stem, frames = self.plan[modality]
        module, b = self.stems[stem], x.size(0)
        if modality == registry.TEXT:  # every position runs; the mask marks SOT .. EOT
            return b, x.size(1), 0, int(valid_mask(x, self.cfg.eot_id).sum())
        patch = getattr(module, "patch", None)
        if patch is None:  # a plugin's own stem: its nominal tokens
            n = registry.get(modality).tokens(self.cfg)
            return b, n, b * n, b * n
        shape = registry.get(modality).stem_input(x, frames).shape[2:]
        patches = math.prod(size // p for size, p in zip(shape, patch, strict=True))
        rate = module.drop_token if drop is None else drop
        # mmpt.model.stems.PatchStem's DropToken: the same kept count for every sample
        n = max(1, round(patches * (1 - rate))) if rate > 0 else patches
        return b, n, b * patches, b * n

    def forward(self, batch: dict, modalities: list, drop_token: dict | None = None) -> float:
        """Forward FLOPs of the model on one micro-batch (what mmpt.train.engine.TrainModule runs)."""
        cfg, runs = self.cfg, {}
        flops = 0.0
        for m in modalities:
            b, n, patches, real = runs[m] = self.run(m, batch[m], (drop_token or {}).get(m))
            flops += stem_flops(cfg, m, self.stems[self.plan[m][0]], patches)
            flops += trunk_flops(cfg, b, n, real, moe_slots(cfg.moe, real)) + pooling_flops(cfg, b, n)
        others = [m for m in runs if m != registry.TEXT]
        if self.decoder and registry.TEXT in runs and len(others) == 1:  # the model captions the other modality
            b, n, _, real = runs[registry.TEXT]
            flops += decoder_flops(cfg, b, n, runs[others[0]][1], real - b)  # targets: the real tokens after SOT
        return flops


def open_window(cfg, world: int, device: torch.device, dtype: torch.dtype, say=None) -> dict:
    """The log window's state: the FLOP counter, both peaks (per device, for the engine's device and dtype),
    and its start time, taken last: the model accounting and the probe are not training time."""
    counter = StepFlops(cfg.model)
    peak, source = peak_flops(cfg, device, dtype)
    probe = matmul_peak(device, dtype)
    if say is not None:
        say(f"mfu: {source}; mfu_probe: against a measured {dtype} matmul rate of {probe / 1e12:.3g} TFLOP/s")
    return {"counter": counter, "peak": peak, "probe": probe, "world": world, "flops": 0.0, "n": 0, "wait": 0.0,
            "sums": {}, "t": time.time()}


def window_throughput(sums: dict, seconds: float, world: int, flops: float, peak: float | None,
                      probe: float) -> dict:
    """sums: (task, key) -> summed step values of one rank (mmpt.train.loop's running sums); every rank ran
    the same tasks at the same batch size, so tokens scale with the world size. flops: the window's model FLOPs
    summed over ranks; peak, probe: per device."""
    tokens: dict = {}
    for (_, key), value in sums.items():
        if key.startswith(TOKEN_KEY):
            m = key[len(TOKEN_KEY):]
            tokens[m] = tokens.get(m, 0.0) + float(value) * world
    out = {f"tokens_per_s/{m}": n / seconds for m, n in tokens.items()}
    out["model_tflops_per_s"] = flops / seconds / 1e12
    if peak:
        out["mfu"] = flops / seconds / (peak * world)
    out["mfu_probe"] = flops / seconds / (probe * world) if probe else 0.0
    return out
