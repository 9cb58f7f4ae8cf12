"""Preemption: SIGTERM or SIGUSR1 (SLURM's warning signal, see launchers/slurm.sbatch) asks the run to stop at
the next step boundary: every rank checkpoints, rank 0 writes RUN/preempted (the launcher requeues the job when
it finds it) and the process exits 0.

    kill -USR1 <worker pids>      # or scancel --signal=USR1, or SLURM's --signal=B:USR1@180 via the sbatch
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from mmpt.distributed import STOP_SIGNALS, collective_device

MARKER = "preempted"


class Preemption:
    """Installs the handlers (main thread only) and tells, identically on every rank, whether to stop now."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def stop_now(self) -> bool:
        """Any rank signalled? One tiny all-reduce per step, so every rank stops at the same step."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def mark(out_dir: str | Path, step: int) -> None:
    (Path(out_dir) / MARKER).write_text(f"{step}\n")


def clear(out_dir: str | Path) -> None:
    (Path(out_dir) / MARKER).unlink(missing_ok=True)
