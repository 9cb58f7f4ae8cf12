"""Loader workers and stop signals: a SIGTERM from anyone but the worker's rank (torchrun's signal to the rank's
process group, scancel's to every process) leaves the worker running for its rank to checkpoint; the rank
itself can still end it (multiprocessing's exit handler sends SIGTERM and then waits for the worker)."""
from __future__ import annotations

import sys

from tests.conftest import run

SCRIPT = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from mmpt.distributed import shield_from_stop_signals

class Zeros(IterableDataset):
    def __iter__(self):
        while True:
            time.sleep(0.01)
            yield torch.zeros(2)

it = iter(DataLoader(Zeros(), batch_size=None, num_workers=1, worker_init_fn=shield_from_stop_signals,
                     persistent_workers=True))
next(it)
worker = it._workers[0].pid
os.system(f"kill -TERM {worker}; kill -USR1 {worker}")  # from a shell, not from this process
time.sleep(1)
next(it)
print("alive", os.path.exists(f"/proc/{worker}"), flush=True)
sys.exit(0)  # the loader is left to multiprocessing's exit handler: SIGTERM to the worker, then join
"""


def test_worker_outlives_a_strangers_stop_signal_and_ends_with_its_rank():
    proc = run([sys.executable, "-c", SCRIPT], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "alive True" in proc.stdout
