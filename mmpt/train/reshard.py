"""Resume a run on another number of ranks: ZeRO 1-3 through DeepSpeed's universal checkpoint, ZeRO-0 as is.

ZeRO 1-3 shard the optimizer by data-parallel rank, and DeepSpeed refuses such a checkpoint at another world size.
Rank 0 converts it once (`python -m deepspeed.checkpoint.ds_to_universal`, per-parameter fp32 weights and Adam
moments) into TAG_universal, every rank's engine is built with `checkpoint.load_universal` and loads it, and the
converted copy is removed: later saves are ordinary checkpoints at the new world size. ZeRO-0 keeps the whole
optimizer in one file that loads at any world size. Checked against the N-rank run: weights, both Adam moments,
step and LR schedule equal after the load, and the next step equal to fp32 rounding (ZeRO 0-3, 1<->2, 2->3).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmpt.errors import ConfigError

SUFFIX = "_universal"


def needs_universal(cfg, before: int, world: int) -> bool:
    """Whether resuming a checkpoint saved on `before` ranks needs the universal path; refuses what cannot."""
    if before == world or cfg.deepspeed.zero_stage == 0:
        return False
    if cfg.model.moe.backend == "deepspeed" and cfg.model.moe.num_experts > 1:
        raise ConfigError(f"train.resume: this run was saved on {before} ranks; resuming a model.moe.backend="
                          f"deepspeed run on {world} ranks is not supported (expert-parallel groups change). Resume on "
                          f"{before} ranks, or export and start a native-backend run from the weights")
    return True


def convert(ckpt_dir: Path, tag: str, log) -> str:
    """Rank 0 writes TAG_universal (2-4 s for the demo model); every rank returns its name after a barrier."""
    out = f"{tag}{SUFFIX}"
    if dist.get_rank() == 0:
        log(f"checkpoint {tag}: saved on another number of ranks; converting to DeepSpeed's universal format")
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(ckpt_dir / tag), "--output_folder", str(ckpt_dir / out), "--inject_missing_state",
                               "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed's ds_to_universal failed: {tail}")
    dist.barrier()
    return out


def load(engine, ckpt_dir: Path, universal_tag: str, zero_stage: int) -> dict:
    names = [g.get("name") for g in engine.optimizer.optimizer.param_groups]  # before DeepSpeed overwrites them
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=universal_tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / universal_tag}: DeepSpeed could not load the universal checkpoint")
    if zero_stage == 3:
        _fix_zero3_groups(engine, ckpt_dir / universal_tag, names)
    _restore_buffers(engine, ckpt_dir / universal_tag[:-len(SUFFIX)])
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt_dir / universal_tag, ignore_errors=True)
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    return client_state or {}


def _restore_buffers(engine, step_dir: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load leaves the module's buffers (the model's running centres) as the
    fresh engine built them: take them from the checkpoint that was converted."""
    files = sorted(step_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return
    saved = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {}
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name in saved:
                buf.copy_(saved[name].to(buf.device, buf.dtype))


def _fix_zero3_groups(engine, universal_dir: Path, names: list) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal load gives every param group the saved group 0's settings (weight
    decay on the no-decay group) and one shared `step` tensor (AdamW then counts one step per group, wrong bias
    correction). Restore each group's settings by position, names checked, and give each its own step."""
    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    saved_names = [g.get("name") for g in saved]
    if len(saved) != len(groups) or (any(saved_names) and saved_names != names):
        raise RuntimeError(f"{universal_dir}: optimizer groups {saved_names} != this engine's {names}")
    for group, old in zip(groups, saved, strict=True):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
