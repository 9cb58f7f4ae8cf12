"""DeepSpeed checkpoints: durable atomic saves with per-rank state, keep the newest K, resume (reading them back
into one state dict: mmpt.train.consolidate).

Layout: RUN/checkpoints/step0000200/ (DeepSpeed's files + rank_<R>.pt per rank), `latest` naming the newest, and
`best` (the best eval, see save_best). A tag is written under step0000200.tmp; every rank fsyncs its files, and
once every rank has finished rank 0 fsyncs the directories, renames the directory into place (swapping it in
one step for a tag of the same name), fsyncs the parent, then replaces `latest` the same way and only then prunes.
A crash or power loss at any point leaves `latest` naming a complete tag on disk.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

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
