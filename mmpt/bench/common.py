"""What the benches share: a median timer and a peak-memory tracker."""
from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(step: Callable, repeats: int, before: Optional[Callable] = None) -> float:
    """Median wall time of `step` in ms; `before` runs untimed ahead of each repeat."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        _sync()
        start = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensor storages ops create while active, live at the worst moment. (Not torch's
    MemTracker: it cannot follow the no-grad module calls GradCache makes.)"""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._refs = 0, 0, {}

    def _track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._refs or storage.nbytes() == 0:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def _free(self, key, size) -> None:
        self._refs.pop(key, None)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_mb(step) -> float:
    with PeakMemory() as tracker:
        step()
    return tracker.peak / 2**20


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (torch's FlopCounterMode: matmuls, convolutions, attention). torch's table
    knows the GPU attention kernels but not the CPU one (it counted CPU attention as 0): added here."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    cpu = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}
    with FlopCounterMode(display=False, custom_mapping=cpu) as counter:  # grad on: the module tracker's hooks need it
        fn()
    return int(counter.get_total_flops())
