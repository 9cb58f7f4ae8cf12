"""DeepSpeed checkpoints: durable atomic saves with per-rank state, keep the newest K, resume, consolidate to one
state dict.

Layout: RUN/checkpoints/step0000200/ (DeepSpeed's files + rank_<R>.pt per rank), `latest` naming the newest, and
`best` (the best eval, see save_best). A tag is written under step0000200.tmp; every rank fsyncs its files, and
once every rank has finished rank 0 fsyncs the directories, renames the directory into place (swapping it in
one step for a tag of the same name), fsyncs the parent, then replaces `latest` the same way and only then prunes.
A crash or power loss at any point leaves `latest` naming a complete tag on disk.
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mmpt.train import faults, reshard
from mmpt.train.resume import (
    TAG_RE,
    choose_tag,
    complete,
    load_rank_state,
    save_rank_state,
    saved_world,
    set_rng_state,
)

TAG = "step{:07d}"
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _fsync(path: Path) -> float:
    """fsync a file or directory (opened read-only: enough on Linux for both); returns the seconds it took."""
    began = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - began


def fsync_tree(root: Path, files: bool = True, dirs: bool = True) -> float:
    """Files, then each directory after its contents (bottom-up); returns the seconds spent in fsync."""
    spent = 0.0
    for parent, _, names in os.walk(root, topdown=False):
        for name in sorted(names) if files else []:
            try:
                spent += _fsync(Path(parent) / name)
            except FileNotFoundError:  # another rank's scratch file, gone: its writer syncs what it keeps
                pass
        if dirs:
            spent += _fsync(Path(parent))
    return spent


def write_durable(path: Path, text: str) -> float:
    """Replace `path` atomically and durably: a temporary file, fsynced, renamed over it, the directory fsynced.
    Returns the seconds spent in fsync."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        began = time.perf_counter()
        os.fsync(f.fileno())
        spent = time.perf_counter() - began
    os.replace(tmp, path)
    return spent + _fsync(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the C library or the
    file system lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _rename_into_place(tmp: Path, final: Path) -> float:
    """tmp (complete, fsynced) becomes final; an existing final (the same step saved again, the previous best) is
    swapped out in the same step, so `final` is never missing or a mix of both. Returns the seconds in fsync."""
    if not final.exists():
        os.replace(tmp, final)
    elif not _exchange(tmp, final):  # no atomic swap here: a crash between these renames leaves final missing
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        tmp = old
    spent = _fsync(final.parent)
    shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the replaced tag
    return spent


def _write_tag(engine, ckpt_dir: Path, name: str, client_state: dict, write_more: Callable[[Path], None],
               fault: tuple[str, int]) -> tuple[Path, float]:
    """Every rank: DeepSpeed's files and write_more's under NAME.tmp, then fsyncs them (each rank its own, and
    those of other ranks it sees: fsync of a clean file is cheap). After a barrier rank 0 fsyncs the directories
    and renames NAME.tmp into place. Returns the tag's path and this rank's seconds in fsync."""
    rank = dist.get_rank()
    tmp, final = ckpt_dir / f"{name}.tmp", ckpt_dir / name
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a save that died
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    write_more(tmp)
    spent = fsync_tree(tmp, dirs=False)
    faults.maybe(fault[0], fault[1], rank)
    dist.barrier()
    if rank == 0:
        spent += fsync_tree(tmp, files=False)  # every rank's directory entries, before the rename publishes them
        spent += _rename_into_place(tmp, final)
        spent += _fsync(ckpt_dir.parent)  # the first save created ckpt_dir itself
    return final, spent


def save(engine, out_dir: str | Path, step: int, client_state: dict, keep: int, data_state: dict,
         log: Callable[[str], None] = tqdm.write) -> Path:
    """Every rank: DeepSpeed's shards and its own rank file under TAG.tmp, durably; rank 0 then renames the
    directory into place, points `latest` at it and prunes this run line's tags to the newest `keep` (see
    _prune). Rank 0 logs the save's time and the part of it spent in fsync."""
    began = time.perf_counter()
    ckpt_dir, rank, world = checkpoint_dir(out_dir), dist.get_rank(), dist.get_world_size()
    tag = TAG.format(step)
    previous = latest_tag(ckpt_dir) if rank == 0 else None  # where this run line stood before this save
    final, spent = _write_tag(engine, ckpt_dir, tag, {**client_state, "step": step},
                              lambda tmp: save_rank_state(tmp, rank, world, data_state), ("save", step))
    if rank == 0:
        spent += write_durable(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, tag, previous, keep, log)  # only once the new tag and `latest` are on disk
        log(f"checkpoint {tag}: saved in {time.perf_counter() - began:.2f} s, {spent:.3f} s of it in fsync "
            f"(rank 0)")
    dist.barrier()
    return final


def save_best(engine, out_dir: str | Path, step: int, client_state: dict, tag: str = "best") -> Path:
    """Every rank: the best-eval checkpoint, saved as save() saves a step (under TAG.tmp, fsynced, renamed in
    place of the previous best in one step): a crash mid-save leaves the previous best whole, and a best saved
    on another world size holds no rank files of the old one. Never `latest`, never pruned."""
    final, _ = _write_tag(engine, checkpoint_dir(out_dir), tag, {**client_state, "step": step}, lambda tmp: None,
                          (tag, step))
    dist.barrier()
    return final


def _step(tag: str) -> int:
    return int(tag[len("step"):])


def _prune(ckpt_dir: Path, tag: str, previous: str | None, keep: int, log: Callable[[str], None]) -> None:
    """This run line is `tag` and the tags up to `previous` (what `latest` named before this save: the tag this
    run resumed from or last saved). Tags past it are another line's, abandoned when `latest` was set back or
    train.resume=false started over: they would win a restart if `latest` were ever lost, and this line will
    write those steps itself, so they go whatever `keep` says. Of this line, the newest `keep` stay (0: all).
    `tag`, which `latest` now names, is never removed."""
    step = _step(tag)
    base = step
    if previous and TAG_RE.fullmatch(previous) and complete(ckpt_dir / previous) and _step(previous) < step:
        base = _step(previous)
    tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name) and p.name != tag)
    abandoned = [p for p in tags if _step(p.name) > base]
    line = [p for p in tags if _step(p.name) <= base]
    if abandoned:
        since = "this save" if base == step else f"{TAG.format(base)}, where this run resumed or last saved"
        log(f"checkpoint: removing {', '.join(p.name for p in abandoned)}: newer than {since} (left by a "
            "rollback or an earlier run)")
    old = line[:max(0, len(line) - (keep - 1))] if keep > 0 else []
    for path in abandoned + old:
        shutil.rmtree(path, ignore_errors=True)


def find(out_dir: str | Path, log=print) -> tuple[str | None, int | None]:
    """Before the engine is built: the tag to resume from and the world size it was saved with (None, None
    when starting fresh; world None for mmpt checkpoints from before rank files, taken as unchanged)."""
    ckpt_dir = checkpoint_dir(out_dir)
    tag = choose_tag(ckpt_dir, log)
    return tag, (saved_world(ckpt_dir / tag) if tag else None)


def resume(engine, out_dir: str | Path, tag: str, before: int, universal: bool, zero_stage: int) -> dict:
    """Load `tag` (see find) with this rank's RNG states. Returns the client state plus "tag", "world" (saved
    with) and "rank_state" (this rank's data state; None on another world size). `universal`: the engine was
    built to load DeepSpeed's universal form (another world size, ZeRO 1-3; see reshard)."""
    ckpt_dir = checkpoint_dir(out_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if universal:
        client_state = reshard.load(engine, ckpt_dir, reshard.convert(ckpt_dir, tag, print), zero_stage)
    else:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    mine = load_rank_state(ckpt_dir / tag, rank) if before == world else None
    if mine is not None:
        set_rng_state(mine["rng"])
    legacy = (client_state or {}).pop("data", None)  # mmpt before rank files kept every rank's state here
    data = mine["data"] if mine is not None else legacy[rank] if legacy and before == world else None
    return {**(client_state or {}), "tag": tag, "world": before, "rank_state": data}


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict:
    """Full fp32 state dict of the wrapped model from any ZeRO stage and either MoE backend, on CPU, without a
    process group, in the native backend's layout: a model built with `model.moe.backend=native` loads it
    strictly, whichever backend trained the run."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint found (no 'latest' file or tag directory)")
    step_dir = ckpt_dir / tag
    if (step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():  # ZeRO-3: parameters partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"{step_dir}: not a readable ZeRO-3 checkpoint ({_first_line(e)})") from None
    else:
        state = _zero012_state_dict(step_dir)
    prefix = "model."  # TrainModule wraps the model
    return native_moe_layout({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


# ---- ZeRO 0-2 --------------------------------------------------------------------------------------------
# zero_to_fp32 can't read DeepSpeed-MoE checkpoints: it takes the per-expert files for model-state files, and
# it concatenates every optimizer group over all ranks, while expert groups are partitioned over the expert
# data-parallel group only and each expert-parallel rank holds other experts under the same local names.

EXPERT_KEY = re.compile(r"(?P<layer>.+)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<expert>\d+)\."
                        r"(?P<param>fc[12]\.(?:weight|bias))")
ROUTER_SUFFIX = ".moe.deepspeed_moe.gate.wg.weight"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load(path: Path, mmap: bool = False) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: torch's own errors span many lines and types
        raise ValueError(f"{path}: not a readable checkpoint file ({_first_line(e)})") from None


def _shard_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _zero012_state_dict(step_dir: Path) -> dict:
    """The saved module weights (non-expert ones in mp_rank_00, DeepSpeed-MoE experts in
    layer_L_expert_E_mp_rank_00_model_states.pt under their global expert index), replaced by the optimizer's
    fp32 master weights where ZeRO 1/2 shards hold them (bf16/fp16 runs save 16-bit module weights)."""
    model_file = step_dir / "mp_rank_00_model_states.pt"
    model_states = _load(model_file)
    if "module" not in model_states or "param_shapes" not in model_states:
        raise ValueError(f"{model_file}: not a DeepSpeed model-states file (no 'module' or 'param_shapes')")
    saved = dict(model_states["module"])
    for path in sorted(step_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        saved.update(_load(path))
    # bf16 runs name them bf16_zero_pp_rank_R_...
    shard_files = sorted(step_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_shard_rank)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}
    if not shard_files:  # ZeRO-0: the module weights are the weights
        return state
    shards = [_load(path, mmap=True).get("optimizer_state_dict", {}) for path in shard_files]
    if any("single_partition_of_fp32_groups" not in s for s in shards):
        raise ValueError(f"{step_dir}: optimizer shards without fp32 partitions (not a ZeRO 1/2 checkpoint)")
    for name, master in _zero12_masters(model_states["param_shapes"], shards).items():
        if name not in saved or not torch.equal(master.to(saved[name].dtype), saved[name]):
            # A layout this reader gets wrong must fail loudly, not hand back shuffled weights.
            raise ValueError(f"{step_dir}: fp32 master weights of {name} do not match the saved module weights")
        state[name] = master
    return state


def _zero12_masters(param_shapes: list, shards: list) -> dict:
    """Unflatten ZeRO 1/2 fp32 partitions. A group partitioned over N / ep ranks (the expert data-parallel
    group) holds different experts on each of the ep expert-parallel ranks; DeepSpeed's default E + D layout
    puts expert-parallel rank i's group on ranks i, i + ep, i + 2 ep, ... and its experts at global indices
    i * local + 0 .. local - 1."""
    world, state = len(shards), {}
    counts = shards[0]["partition_count"]
    paddings = shards[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        count = counts[g] if isinstance(counts, list) else counts
        if world % count:
            raise ValueError(f"optimizer group {g} is partitioned over {count} ranks, not a divisor of {world}")
        ep = world // count
        local = _local_experts(shapes) if ep > 1 else 0
        for ep_rank in range(ep):
            flat = torch.cat([shards[r]["single_partition_of_fp32_groups"][g] for r in range(ep_rank, world, ep)])
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                if offset + numel > flat.numel():
                    raise ValueError(f"optimizer group {g} holds {flat.numel()} values, too few for {name}")
                key = _global_expert(name, ep_rank * local) if ep > 1 else name
                state[key] = flat.narrow(0, offset, numel).view(tuple(shape)).detach().clone()
                offset += numel + (paddings[g][i] if paddings else 0)
    return state


def _local_experts(shapes: dict) -> int:
    ids = [int(m["expert"]) for name in shapes if (m := EXPERT_KEY.fullmatch(name))]
    if not ids:
        raise ValueError(f"an expert-parallel optimizer group holds no expert parameters ({next(iter(shapes))})")
    return max(ids) + 1


def _global_expert(name: str, offset: int) -> str:
    m = EXPERT_KEY.fullmatch(name)
    if m is None:
        raise ValueError(f"{name}: a non-expert parameter in an expert-parallel optimizer group")
    return f"{m['layer']}.moe.deepspeed_moe.experts.deepspeed_experts.{int(m['expert']) + offset}.{m['param']}"


# ---- DeepSpeed-MoE keys -> NativeMoE's ---------------------------------------------------------------------

def native_moe_layout(state: dict) -> dict:
    """DeepSpeed MoE layers' keys -> NativeMoE's, the inverse of mmpt.model.moe.copy_native_to_deepspeed: the gate
    becomes router.weight, expert e's fc1/fc2 (nn.Linear, (out, in)) become w1[e] (D, H), b1[e], w2[e] (H, D),
    b2[e]. Other keys pass through unchanged."""
    out, experts = {}, {}
    for key, value in state.items():
        if (m := EXPERT_KEY.fullmatch(key)) is not None:
            experts.setdefault(m["layer"], {})[int(m["expert"]), m["param"]] = value
        elif key.endswith(ROUTER_SUFFIX):
            out[key[: -len(ROUTER_SUFFIX)] + ".router.weight"] = value
        else:
            out[key] = value
    for layer, params in experts.items():
        n = 1 + max(e for e, _ in params)
        missing = [f"{e}.{p}" for e in range(n) for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
                   if (e, p) not in params]
        if missing:
            raise ValueError(f"{layer}: experts missing from the checkpoint ({', '.join(missing[:4])})")
        for native, param, transpose in (("w1", "fc1.weight", True), ("b1", "fc1.bias", False),
                                         ("w2", "fc2.weight", True), ("b2", "fc2.bias", False)):
            out[f"{layer}.{native}"] = torch.stack([params[e, param].t() if transpose else params[e, param]
                                                    for e in range(n)]).contiguous()
    return out
