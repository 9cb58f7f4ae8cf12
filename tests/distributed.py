"""Run a function on N real gloo processes (torch.multiprocessing) and collect each rank's return value."""
from __future__ import annotations

import io
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn, args, queue) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        buf = io.BytesIO()  # bytes, not shared-memory tensors: those vanish when this process exits
        torch.save(result, buf)
        queue.put((rank, buf.getvalue(), None))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        queue.put((rank, None, traceback.format_exc()))


def run_distributed(fn, world: int, *args, timeout: float = 300) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(world):
            rank, result, error = queue.get(timeout=timeout)
            if error:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = torch.load(io.BytesIO(result), weights_only=False)
        for p in procs:
            p.join(timeout=60)
    return [results[r] for r in range(world)]
