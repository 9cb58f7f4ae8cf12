"""What the training loaders hold in shared memory: bytes per batch of each task, and per rank in flight.

    mmpt model info imp_moe_b16          # prints it; --json has it under "loader_memory"

Each task has its own DataLoader (mmpt.data.stream) whose workers hand batches to the trainer through shared
memory: `data.num_workers x data.prefetch` batches in flight per task, so a rank holds the sum over tasks.
Media travel compact (uint8 pixels, float16 fbank; the model normalises on its device) because float32 media
would take 4x (2x) the shared memory; `float32_bytes` is that batch as float32, for comparison. Device memory
holds one task's batch at a time (one task per step), so it is bounded by the largest task.
"""
from __future__ import annotations

import math

import torch

from mmpt import modality as registry
from mmpt.data.stream import tasks_from_config


def _bytes(shape: tuple, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def task_memory(task) -> dict:
    """One TaskConfig (mmpt.data.stream) -> bytes of one batch, compact and as float32 media."""
    settings = task.settings
    compact = float32 = 0
    for m in task.modalities:
        entry = registry.get(m)
        if entry.sample_shape is None:
            continue
        shape = entry.sample_shape(settings)
        compact += _bytes(shape, entry.sample_dtype)
        float32 += _bytes(shape, entry.sample_dtype if m == registry.TEXT else torch.float32)
    return {"batch_size": task.batch_size, "batch_bytes": compact * task.batch_size,
            "float32_batch_bytes": float32 * task.batch_size}


def loader_memory(cfg) -> dict:
    """Per task and per rank in flight (workers x prefetch batches of every task), compact and float32."""
    tasks, _ = tasks_from_config(cfg, expand=False)
    per = {name: task_memory(t) for name, t in tasks.items()}
    flight = max(1, cfg.data.num_workers) * cfg.data.prefetch
    return {"tasks": per, "batches_in_flight_per_task": flight,
            "in_flight_bytes_per_rank": flight * sum(t["batch_bytes"] for t in per.values()),
            "float32_in_flight_bytes_per_rank": flight * sum(t["float32_batch_bytes"] for t in per.values()),
            "largest_batch_bytes": max(t["batch_bytes"] for t in per.values())}
