"""train.resume_from: a fresh run directory starts from a checkpoint on the Hub (or in another directory).

    NPROC=2 launchers/torchrun.sh train --config demo train.out_dir=runs/b train.resume_from=hf-hub:me/run

The source holds what a train.hub.strategy=checkpoint push wrote: checkpoint/{latest, <tag>/, config.yaml,
metrics.jsonl}; local-dir:PATH may also name a run directory (checkpoints/, config.yaml, metrics.jsonl). One
process per node downloads the tag `latest` names into RUN/checkpoints/ (other nodes sharing the directory find
it there), with the config and the metrics up to its step; the run then resumes as from its own checkpoint:
exactly on the same world size, through mmpt.train.reshard on another. A directory that already holds a
checkpoint ignores resume_from, so a restarted run continues from its own newer saves.

DeepSpeed reads checkpoints with pickle, which can call any function the file names. Before that, every
downloaded .pt file's globals are listed without loading it (torch.serialization.get_unsafe_globals_in_checkpoint)
and must be among those DeepSpeed and mmpt write (SAFE_GLOBALS); anything else is an error naming the file,
unless train.trust_checkpoint is set.
"""
from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch

from mmpt.distributed import gather_objects
from mmpt.errors import DataError
from mmpt.hub import HF_HUB, LOCAL_DIR, download
from mmpt.train.checkpoint import checkpoint_dir, fsync_tree, write_durable
from mmpt.train.hub_push import CHECKPOINT
from mmpt.train.resume import choose_tag

# Globals in the pickles of DeepSpeed's and mmpt's checkpoint files beyond torch's own allowlist (seen in 874
# checkpoint files of ZeRO 0-3, fp32 and bf16 runs; fp16 adds DynamicLossScaler): plain data classes, an enum and
# NumPy arrays. Nothing that fetches an attribute or calls by name (getattr would reach any function).
SAFE_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray.scalar",
}


def _sources(source: str, scratch: Path) -> tuple[Path, Path, str]:
    """(folder holding `latest` and the tags, folder holding config.yaml and metrics.jsonl, tag)."""
    if source.startswith(HF_HUB):
        ref = source[len(HF_HUB):]
        root = download(ref, [f"{CHECKPOINT}/latest"], scratch) / CHECKPOINT
        if not (root / "latest").is_file():
            raise DataError(f"train.resume_from={source}: the repo holds no {CHECKPOINT}/latest (push checkpoints "
                            "with train.hub.strategy=checkpoint or all_checkpoints)")
        tag = (root / "latest").read_text().strip()
        download(ref, [f"{CHECKPOINT}/{tag}/*", f"{CHECKPOINT}/config.yaml", f"{CHECKPOINT}/metrics.jsonl"], scratch)
        return root, root, tag
    path = Path(source[len(LOCAL_DIR):])
    for ckpt, meta in ((path / CHECKPOINT, path / CHECKPOINT), (checkpoint_dir(path), path)):
        tag = choose_tag(ckpt, lambda m: None) if ckpt.is_dir() else None
        if tag:
            return ckpt, meta, tag
    raise FileNotFoundError(f"train.resume_from={source}: no {CHECKPOINT}/latest or checkpoints/ with a complete "
                            "checkpoint there")


def check_pickles(tag_dir: Path, source: str) -> None:
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - SAFE_GLOBALS)
        except (ValueError, RuntimeError):  # not torch.save's zip format: a bare pickle cannot be inspected
            unsafe = ["(a pickle that is not torch.save's zip format)"]
        if unsafe:
            raise DataError(f"{path}: names {', '.join(unsafe)}, which loading would call (code the file chose); "
                            f"resume from {source} only if you trust it: train.trust_checkpoint=true")


def place(source: str, out_dir: Path, trust: bool, say: Callable[[str], None]) -> str:
    """The source's newest checkpoint, its config and metrics into out_dir; returns the tag."""
    scratch = out_dir / f".resume-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        ckpt, meta, tag = _sources(source, scratch)
        if not (ckpt / tag).is_dir():
            raise DataError(f"train.resume_from={source}: latest names {tag}, which is not there")
        if not trust:
            check_pickles(ckpt / tag, source)
        target = checkpoint_dir(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        incoming = target / f"{tag}.resume-tmp-{os.getpid()}"
        (shutil.move if ckpt.is_relative_to(scratch) else shutil.copytree)(str(ckpt / tag), str(incoming))
        fsync_tree(incoming)
        if (target / tag).exists():  # another node sharing this directory placed it first
            shutil.rmtree(incoming)
        else:
            os.replace(incoming, target / tag)
        for name in ("config.yaml", "metrics.jsonl"):
            if (meta / name).is_file():
                shutil.copy2(meta / name, out_dir / name)
        write_durable(target / "latest", tag)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(f"train.resume_from: {tag} of {source} placed in {target}")
    return tag


def fetch(cfg, local_rank: int, say: Callable[[str], None]) -> bool:
    """Every rank, after the process group exists: the first process of each node places the checkpoint unless
    out_dir has one; a failure on any node is every rank's one-line error. True when a checkpoint was placed."""
    out_dir = Path(cfg.train.out_dir)
    if not cfg.train.resume_from or not cfg.train.resume or choose_tag(checkpoint_dir(out_dir), lambda m: None):
        return False
    error = None
    if local_rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            place(cfg.train.resume_from, out_dir, cfg.train.trust_checkpoint, say)
        except (DataError, OSError) as e:
            error = f"{type(e).__name__}: {e}" if not isinstance(e, DataError) else str(e)
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise DataError(errors[0])
    return True
