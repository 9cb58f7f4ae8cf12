"""What the launchers (launchers/*) need from Python before any rank starts: SLURM's environment turned into
torchrun arguments, the run directory a command line trains into, SIGUSR1 forwarded to torchrun's workers.
What a rank does about its launcher runs inside the rank: DeepSpeed's runner's environment is completed by
mmpt.distributed.adopt_launcher_env, accelerate's DeepSpeed plugin is checked by mmpt.train.accelerate_plugin.

    python -m mmpt.launch slurm-args                  # torchrun arguments for this SLURM allocation
    python -m mmpt.launch hostnames 'node[001-004,010],gpu7'
    python -m mmpt.launch out-dir train --config demo train.out_dir=runs/x
    python -m mmpt.launch signal-workers --signal USR1 --job "$SLURM_JOB_ID"

The sbatch script runs signal-workers in its SIGUSR1 trap, which SLURM fires 180 s ahead of the end
(--signal=B:USR1@180). Importing mmpt registers the built-in modalities and evals (torch included): a few
seconds of those 180, the price of one registry that every entry point sees the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from mmpt.cli import parse_args
from mmpt.config import load_config
from mmpt.errors import LaunchError

# ---- SLURM ----------------------------------------------------------------------------------------------

def _split_top_level(hosts: str) -> list[str]:
    """'a[1-2,5],b,c[3]' -> ['a[1-2,5]', 'b', 'c[3]']: commas inside brackets belong to the range."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(hosts):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {hosts!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(hosts[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"host list {hosts!r}: unbalanced '['")
    parts.append(hosts[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(body: str, hosts: str) -> list[str]:
    """'001-004,010' -> ['001', '002', '003', '004', '010'] (zero padding of each range kept)."""
    out = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"host list {hosts!r}: bad range {item!r} in [{body}]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"host list {hosts!r}: range {item!r} runs backwards")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, as `scontrol show hostnames` expands it:
    'node[001-004,010],gpu7' -> node001 node002 node003 node004 node010 gpu7; 'r[1-2]-n[1-2]' -> r1-n1 r1-n2 ..."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            if not literal and not body:
                continue
            choices = _expand_range(body, nodelist) if body else [""]
            names = [n + literal + c for n in names for c in choices]
        hosts += names
    return hosts


def _count_gpus(value: str) -> int | None:
    """'8', 'a100:8', 'gpu:a100:4', 'a100:2,v100:2', '4(x2)' -> the count; None when it names none."""
    total, found = 0, False
    for part in value.split(","):
        m = re.fullmatch(r"(?:.*:)?(\d+)(?:\(x\d+\))?", part.strip())
        if m:
            total, found = total + int(m.group(1)), True
    return total if found else None


def _count_devices(value: str) -> int | None:
    """CUDA_VISIBLE_DEVICES / SLURM_JOB_GPUS: '0,1,2,3' or GPU UUIDs -> 4; '', 'NoDevFiles', '-1' -> None."""
    items = [v for v in value.split(",") if v.strip()]
    if not items or items[0].strip() in ("NoDevFiles", "-1"):
        return None
    return len(items)


def gpus_per_node(env: Mapping[str, str] = os.environ) -> int:
    """Processes per node: NPROC if set, else the GPUs SLURM gave this node (SLURM_GPUS_ON_NODE,
    SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS, then CUDA_VISIBLE_DEVICES), else 1 (a CPU allocation)."""
    if env.get("NPROC", "").strip():
        n = int(env["NPROC"])
        if n < 1:
            raise LaunchError(f"NPROC={env['NPROC']}: expected a positive number of processes per node")
        return n
    readers = (("SLURM_GPUS_ON_NODE", _count_gpus), ("SLURM_GPUS_PER_NODE", _count_gpus),
               ("SLURM_JOB_GPUS", _count_devices), ("CUDA_VISIBLE_DEVICES", _count_devices))
    for name, read in readers:
        found = read(env.get(name, ""))
        if found:
            return found
    return 1


def slurm_nodes(env: Mapping[str, str] = os.environ) -> list[str]:
    hosts = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not hosts:
        raise LaunchError("SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation (sbatch/salloc)")
    return expand_hostlist(hosts)


def slurm_nnodes(env: Mapping[str, str] = os.environ) -> int:
    nodes = slurm_nodes(env)
    given = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if given and int(given) != len(nodes):
        raise LaunchError(f"SLURM_JOB_NUM_NODES={given} but the node list names {len(nodes)} nodes: {nodes}")
    return len(nodes)


def rdzv_port(env: Mapping[str, str] = os.environ) -> int:
    """RDZV_PORT, else a port derived from the job id (two jobs sharing a head node don't collide)."""
    if env.get("RDZV_PORT"):
        return int(env["RDZV_PORT"])
    job = env.get("SLURM_JOB_ID", "0")
    return 29400 + int(job) % 1000 if job.isdigit() else 29400


def slurm_torchrun_args(env: Mapping[str, str] = os.environ) -> list[str]:
    """torchrun's node arguments for this allocation: every node runs one torchrun, c10d rendezvous hosted by
    the allocation's first node. Max restarts stay in the sbatch script (MAX_RESTARTS)."""
    nodes = slurm_nodes(env)
    slurm_nnodes(env)  # consistency check
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise LaunchError("SLURM_JOB_ID is not set: run this inside a SLURM allocation (sbatch/salloc)")
    return [f"--nnodes={len(nodes)}", f"--nproc-per-node={gpus_per_node(env)}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes[0]}:{rdzv_port(env)}", f"--rdzv-id={job}"]


# ---- the run directory of an mmpt command line -----------------------------------------------------------

def out_dir(mmpt_args: list[str]) -> str | None:
    """train.out_dir of `mmpt ARGS` as the training will resolve it (the config file, then the overrides);
    None for commands that don't train."""
    args = parse_args(mmpt_args)  # imports its --plugin modules (their evals are subcommands)
    if args.command != "train":
        return None
    return load_config(args.config, args.overrides).train.out_dir


# ---- SIGUSR1 to torchrun's workers ------------------------------------------------------------------------

def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _proc_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:  # another user's process
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def _is_torchrun(cmdline: list[str]) -> bool:
    """torchrun itself: its console script (run by python, or standalone) or `python -m torch.distributed.run`;
    not srun/bash lines that merely mention it."""
    if not cmdline:
        return False
    if cmdline[0] == "torchrun" or cmdline[0].endswith("/torchrun"):
        return True
    if not os.path.basename(cmdline[0]).startswith("python") or len(cmdline) < 2:
        return False
    if cmdline[1] == "torchrun" or cmdline[1].endswith("/torchrun"):
        return True
    head = cmdline[1:5]  # interpreter flags (-u, -X ...) may come before -m
    return any(a == "-m" and b in ("torch.distributed.run", "torch.distributed.launch")
               for a, b in zip(head, head[1:], strict=False))


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the (comm) that may hold spaces
                kids.append(int(entry.name))
    return sorted(kids)


def torchrun_workers(job: str | None = None) -> dict[int, list[int]]:
    """{torchrun pid: its worker pids} on this host, for this user, restricted to SLURM job `job` when given.
    The workers are torchrun's children (torch elastic starts them with subprocess)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if not _is_torchrun(_proc_cmdline(pid)):
            continue
        if job is not None and _proc_env(pid).get("SLURM_JOB_ID") != job:
            continue
        found[pid] = _children(pid)
    return found


def signal_workers(sig: int = signal.SIGUSR1, job: str | None = None) -> int:
    """Send `sig` to every worker of the torchrun processes of this host (never to torchrun itself: it does not
    handle SIGUSR1, whose default action would kill it). Returns how many workers were signalled."""
    sent = 0
    for runner, workers in torchrun_workers(job).items():
        for pid in workers:
            try:
                os.kill(pid, sig)
                sent += 1
            except ProcessLookupError:
                pass
        print(f"{socket.gethostname()}: {signal.Signals(sig).name} to {len(workers)} worker(s) {workers} of "
              f"torchrun {runner}", flush=True)
    if not sent:
        print(f"{socket.gethostname()}: no torchrun workers found" + (f" of job {job}" if job else ""), flush=True)
    return sent


# ---- DeepSpeed's runner -------------------------------------------------------------------------------

def strip_local_rank(argv: list[str]) -> list[str]:
    """`deepspeed -m mmpt.cli ...` without --no_local_rank appends --local_rank=N; LOCAL_RANK carries it too."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank" or arg == "--local-rank":
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out



# ---- command line -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmpt.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("slurm-args", help="torchrun node arguments for this SLURM allocation (one line)")
    p = sub.add_parser("hostnames", help="expand a SLURM host list, one name a line")
    p.add_argument("hosts", nargs="?", help="default: SLURM_JOB_NODELIST")
    p = sub.add_parser("out-dir", help="train.out_dir of an mmpt command line (nothing for other commands)")
    p.add_argument("mmpt_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("signal-workers", help="signal torchrun's workers on this host (not torchrun)")
    p.add_argument("--signal", default="USR1", help="signal name: USR1, TERM, ...")
    p.add_argument("--job", default=None, help="only torchrun processes of this SLURM job id")
    args = ap.parse_args(argv)
    try:
        if args.command == "slurm-args":
            print(shlex.join(slurm_torchrun_args()))
        elif args.command == "hostnames":
            print("\n".join(expand_hostlist(args.hosts) if args.hosts else slurm_nodes()))
        elif args.command == "out-dir":
            rest = args.mmpt_args[1:] if args.mmpt_args[:1] == ["--"] else args.mmpt_args
            found = out_dir(rest)
            if found is not None:
                print(found)
        elif args.command == "signal-workers":
            name = args.signal.upper()
            signal_workers(getattr(signal, name if name.startswith("SIG") else "SIG" + name), args.job)
    except (LaunchError, ValueError, FileNotFoundError) as e:  # mmpt's ConfigError is a ValueError
        print(f"mmpt.launch {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
