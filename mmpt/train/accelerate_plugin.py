"""`accelerate launch` with a DeepSpeed plugin (launchers/accelerate.sh): its ACCELERATE_* variables checked
against the run config. mmpt builds its DeepSpeed engine from the run config alone (mmpt.train.engine), so a
plugin value that disagrees is not applied: each rank-0 run names both sides once, and the run config wins.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from mmpt.train.engine import deepspeed_config


def _precision(ds: dict) -> str:
    return "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "no"


def accelerate_disagreements(cfg, env: Mapping[str, str] = os.environ) -> list[str]:
    """Where `accelerate launch`'s DeepSpeed plugin (its ACCELERATE_* variables) disagrees with the run config."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return []
    ds = deepspeed_config(cfg, 1)
    zero = ds.get("zero_optimization", {})
    out = []

    def differ(var: str, theirs, ours, key: str) -> None:
        if var in env and theirs != ours:
            out.append(f"{var}={env[var]} vs {key}={ours}")

    differ("ACCELERATE_DEEPSPEED_ZERO_STAGE", int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0),
           zero.get("stage", 0), "deepspeed.zero_stage")
    differ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", int(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")),
           ds["gradient_accumulation_steps"], "train.accumulate")
    if env.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower() not in ("none", "auto"):
        differ("ACCELERATE_GRADIENT_CLIPPING", float(env["ACCELERATE_GRADIENT_CLIPPING"]), ds["gradient_clipping"],
               "optim.grad_clip")
    for what in ("optimizer", "param"):
        var = f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE"
        differ(var, env.get(var, "none").lower(), zero.get(f"offload_{what}", {}).get("device", "none"),
               f"deepspeed.extra.zero_optimization.offload_{what}.device")
    # accelerate always sets the precision ("no" by default): "no" counts only when its config file chose it.
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    chosen = "mixed_precision" in env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
    if (mixed != "no" or chosen) and mixed != _precision(ds):
        out.append(f"ACCELERATE_MIXED_PRECISION={mixed} vs deepspeed.bf16={cfg.deepspeed.bf16} "
                   f"(run precision {_precision(ds)})")
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        out.append(f"ACCELERATE_DEEPSPEED_CONFIG_FILE={env['ACCELERATE_DEEPSPEED_CONFIG_FILE']} is not read: "
                   "mmpt generates the DeepSpeed JSON from deepspeed.* (add keys under deepspeed.extra)")
    for var in ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
        if env.get(var, "false").lower() == "true":
            out.append(f"{var}=true is not applied by mmpt")
    return out


def warn_accelerate_disagreements(cfg, rank: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """One warning (rank 0) naming both sides of each disagreement; the run config wins."""
    found = accelerate_disagreements(cfg, env)
    if found and rank == 0:
        print("mmpt: warning: accelerate's DeepSpeed plugin disagrees with the run config, which is what runs "
              "(mmpt builds its DeepSpeed engine from it; set the value in the run config instead): "
              + "; ".join(found), file=sys.stderr, flush=True)
    return found
