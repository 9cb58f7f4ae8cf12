"""What exact resume needs besides DeepSpeed's own files: per-rank RNG seeds and states, per-rank state files,
the choice of the checkpoint to resume from, and the check that the config still describes the same run.

Each rank writes RUN/checkpoints/<tag>/rank_<R>.pt (its RNG states and data-stream state) beside DeepSpeed's
shards and reads back only its own, so resuming costs O(1) per rank, not an all-gather of every rank's state.
"""
from __future__ import annotations

import random
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from mmpt.errors import ConfigError
from mmpt.modality import pair_name

TAG_RE = re.compile(r"step\d{7}")
# Model keys a resumed run may change: they alter training, not what the parameters mean.
FREE_MODEL_KEYS = {"dropout", "grad_checkpointing", "drop_token", "moe.eval_capacity_factor"}


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's torch/Python/NumPy seed: distinct per rank (dropout and DropToken masks differ across ranks)."""
    return zlib.crc32(f"{seed}:rank:{rank}".encode())


def seed_rank(seed: int, rank: int) -> None:
    s = rank_seed(seed, rank)
    torch.manual_seed(s)  # seeds every CUDA device too
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_file(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / f"rank_{rank:05d}.pt"


def save_rank_state(step_dir: Path, rank: int, world: int, data: dict) -> None:
    torch.save({"rank": rank, "world": world, "rng": rng_state(), "data": data}, rank_file(step_dir, rank))


def load_rank_state(step_dir: Path, rank: int) -> dict | None:
    path = rank_file(step_dir, rank)
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def saved_world(step_dir: Path) -> int | None:
    """The world size the checkpoint was written with (None: an mmpt checkpoint from before rank files)."""
    state = load_rank_state(step_dir, 0)
    return None if state is None else int(state["world"])


def complete(step_dir: Path) -> bool:
    """Written to the end: tags appear under their final name only after every rank finished (see save)."""
    return step_dir.is_dir() and TAG_RE.fullmatch(step_dir.name) is not None and any(step_dir.glob("*model_states.pt"))


def choose_tag(ckpt_dir: Path, log) -> str | None:
    """The tag `latest` names if it is complete, else the newest complete one not newer than it (newer ones are
    a line abandoned by a rollback), else the newest complete one (said), else None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    for stale in sorted(ckpt_dir.glob("step*.tmp")):
        log(f"checkpoint: ignoring {stale} (a save that did not finish on every rank)")
    latest_file = ckpt_dir / "latest"
    named = latest_file.read_text().strip() if latest_file.is_file() else None
    if named and complete(ckpt_dir / named):
        return named
    tags = sorted(p.name for p in ckpt_dir.iterdir() if complete(p))
    if named and TAG_RE.fullmatch(named) and any(t <= named for t in tags):
        tags = [t for t in tags if t <= named]  # tag names sort by step
    if tags and named:
        log(f"checkpoint: 'latest' names {named}, which is missing or incomplete; resuming from {tags[-1]}")
    elif tags:
        log(f"checkpoint: no 'latest' file in {ckpt_dir}; resuming from the newest complete tag {tags[-1]}")
    return tags[-1] if tags else None


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tasks(data: dict) -> list:
    return sorted({pair_name(*s["modalities"]) for s in data.get("data", {}).get("sources", [])})


def config_changes(saved: dict, now: dict) -> list[str]:
    """Differences that make a checkpoint describe another run: model keys (except FREE_MODEL_KEYS) and tasks."""
    old, new = _flat(saved.get("model", {}), "model."), _flat(now.get("model", {}), "model.")
    free = {f"model.{k}" for k in FREE_MODEL_KEYS}
    changes = [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in free and not any(k.startswith(f + ".") for f in free)]
    if _tasks(saved) != _tasks(now):
        changes.append(f"tasks: {_tasks(saved)} -> {_tasks(now)}")
    return changes


def check_same_run(saved: dict, now: dict, run_dir: Path) -> None:
    changes = config_changes(saved, now)
    if changes:
        raise ConfigError(f"train.resume: {run_dir} holds another run ({'; '.join(changes)}); use a new "
                          "train.out_dir, or train.resume=false to start over there")
