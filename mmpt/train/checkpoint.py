"""DeepSpeed checkpoints: save with client state, keep the newest K, resume, consolidate to one state dict.

Layout: RUN/checkpoints/step0000200/... plus DeepSpeed's `latest` file naming the newest tag.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

TAG = "step{:07d}"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def save(engine, out_dir: str | Path, step: int, client_state: dict, keep: int) -> Path:
    ckpt_dir = checkpoint_dir(out_dir)
    tag = TAG.format(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "step": step})
    if dist.get_rank() == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step\d{7}", p.name))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def resume(engine, out_dir: str | Path) -> dict:
    """Load the newest checkpoint if there is one; returns its client state ({} when starting fresh)."""
    ckpt_dir = checkpoint_dir(out_dir)
    if latest_tag(ckpt_dir) is None:
        return {}
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"{ckpt_dir}: 'latest' names {latest_tag(ckpt_dir)} but DeepSpeed could not load it")
    return client_state or {}


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Full fp32 state dict of the wrapped model from any ZeRO stage, on CPU, without a process group."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found (no 'latest' file or tag directory)")
    if list((ckpt_dir / tag).glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO stage 0 keeps the whole module in the model states file
        path = ckpt_dir / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    prefix = "model."  # TrainModule wraps the model
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
