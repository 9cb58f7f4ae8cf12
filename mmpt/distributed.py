"""Process-group helpers: start and stop torch.distributed (gloo on CPU, NCCL on GPUs), where this rank
stands, and `CountBytes`, which counts what a rank hands to torch.distributed while a block runs:

    with CountBytes() as sent:
        loss.backward()
    sent.bytes

CountBytes wraps (and still calls) the real collectives and point-to-point ops, so whatever a loss actually
sends is counted, its own size checks included: each call adds the payload this rank sends to its peers,
whatever algorithm the backend uses underneath (all_gather: the input to N - 1 peers; all_to_all and scatter:
every part but its own; all_reduce: 2 (N - 1) / N of the tensor, a ring all-reduce; send: the tensor;
batch_isend_irecv: every isend's tensor; `isend` itself stays unwrapped, P2POp accepts only the real one).
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import MutableMapping
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

# What a job is asked to stop with: SIGTERM from torchrun, scancel, Kubernetes or a spot reclaim; SIGUSR1 from
# SLURM's --signal ahead of a time limit. The trainer checkpoints on either (mmpt.train.preempt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def shield_from_stop_signals(_worker_id: int = 0) -> None:
    """A loader worker's `worker_init_fn`: a stop signal from anyone but the worker's own rank is the rank's to
    handle. torchrun signals each rank's whole process group, loader workers included, and scancel or an
    eviction signals every process; a worker that died of it made its rank raise before the step boundary
    where it would checkpoint. The rank itself still ends its workers with SIGTERM (DataLoader's shutdown,
    multiprocessing's exit handler, which then waits for them), as torch's own worker handler allows.
    The signals are blocked and taken by a thread that can see the sender (`sigwaitinfo`), which a Python
    signal handler cannot."""
    rank = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(rank,), name="mmpt-stop-signals", daemon=True).start()


def _take_stop_signals(rank: int) -> None:
    while True:
        if signal.sigwaitinfo(set(STOP_SIGNALS)).si_pid == rank:
            os._exit(0)  # as torch's worker handler does on its parent's SIGTERM


def dist_info() -> tuple[int, int]:
    """(rank, world size): from the process group, else from torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable), in rank order; just [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def adopt_launcher_env(env: MutableMapping[str, str] = os.environ) -> None:
    """Fill in what torchrun sets and other launchers name differently. DeepSpeed's runner
    (launchers/deepspeed.sh) sets LOCAL_SIZE, not LOCAL_WORLD_SIZE, which contrastive_group_size=-1 (one node)
    reads. Called before the process group starts (init_distributed)."""
    if "LOCAL_WORLD_SIZE" not in env and env.get("LOCAL_SIZE"):
        env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]


def init_distributed() -> tuple[int, int]:
    """Init the process group (gloo without CUDA, nccl with it) once; works with and without torchrun."""
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    adopt_launcher_env()  # DeepSpeed's runner names LOCAL_WORLD_SIZE differently
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized() and _restarted_under_agent_store():
        _init_after_restart(backend)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def _restarted_under_agent_store() -> bool:
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def _init_after_restart(backend: str) -> None:
    """After torchrun --max-restarts restarted the group: torchrun's store outlives the restart and still holds
    the dead group's addresses, which the new group would read (gloo: "connectFullMesh failed ... Connection
    refused"). A key prefix per attempt keeps the groups apart."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=30))
    prefixed = dist.PrefixStore(f"mmpt/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: NCCL moves only CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed() -> None:
    # gloo processes exiting without teardown sometimes abort; always barrier + destroy.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_distributed() -> None:
    """After an exception on this rank: leave without the barrier, which could wait forever for ranks stuck in
    a collective this rank never reaches."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already broken by the failure that brought us here; exiting is what matters
            pass


# ---- bytes sent, counted at the torch.distributed calls --------------------------------------------------

def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _world(kwargs) -> int:
    return dist.get_world_size(kwargs.get("group"))


def _rank(kwargs) -> int:
    return dist.get_rank(kwargs.get("group"))


def _bind(args: tuple, kwargs: dict, names: tuple) -> dict:
    return {**dict(zip(names, args, strict=False)), **kwargs}  # trailing arguments may be keywords


def _all_gather(k) -> int:
    return _nbytes(k["tensor"]) * (_world(k) - 1)


def _all_to_all(k) -> int:
    return sum(_nbytes(t) for i, t in enumerate(k["input_tensor_list"]) if i != _rank(k))


def _scatter(k) -> int:
    if k.get("scatter_list") is None or _rank(k) != dist.get_group_rank(k.get("group") or dist.group.WORLD, k["src"]):
        return 0
    return sum(_nbytes(t) for i, t in enumerate(k["scatter_list"]) if i != _rank(k))


def _all_reduce(k) -> int:
    world = _world(k)
    return 2 * (world - 1) * _nbytes(k["tensor"]) // world


def _batch_p2p(k) -> int:
    return sum(_nbytes(op.tensor) for op in k["p2p_op_list"] if op.op is c10d.isend)


# name -> (argument names, bytes this rank sends)
_COUNTED = {
    "all_gather": (("tensor_list", "tensor", "group"), _all_gather),
    "all_to_all": (("output_tensor_list", "input_tensor_list", "group"), _all_to_all),
    "scatter": (("tensor", "scatter_list", "src", "group"), _scatter),
    "all_reduce": (("tensor", "op", "group"), _all_reduce),
    "send": (("tensor", "dst", "group"), lambda k: _nbytes(k["tensor"])),
    "batch_isend_irecv": (("p2p_op_list",), _batch_p2p),
}


class CountBytes:
    def __init__(self):
        self.bytes, self.calls, self._saved = 0, 0, {}

    def _wrap(self, name: str, real):
        names, count = _COUNTED[name]

        def counted(*args, **kwargs):
            self.bytes += count(_bind(args, kwargs, names))
            self.calls += 1
            return real(*args, **kwargs)
        return counted

    def __enter__(self) -> CountBytes:
        for name in _COUNTED:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()
