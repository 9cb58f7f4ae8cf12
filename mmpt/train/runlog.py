"""Run logging: metrics to a JSONL file and tensorboard (rank 0 only).

A run restarted from the checkpoint of step S drops what the crashed run logged after S, in both places, so each
step is logged once: metrics.jsonl is rewritten without those records (atomically), and tensorboard is opened
with purge_step=S + 1, which makes its readers discard the older events from step S + 1 on.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start_step)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Called before each checkpoint: what the checkpoint covers must be on disk if the run dies after it."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to last_step (the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [r for r in _records(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def read_metrics(out_dir: str | Path) -> list[dict]:
    return _records(Path(out_dir) / "metrics.jsonl")
