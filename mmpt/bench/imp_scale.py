"""The shipped IMP configs at their real widths on one GPU: step time, MFU, peak memory, loader share, MoE / dense.

    mmpt bench imp-scale --out runs/imp_scale.json                  # one GPU, bf16, 300 steps each
    mmpt bench imp-scale --steps 100 --batch 128 --configs imp_b16  # smaller
    mmpt bench imp-scale --cpu-smoke --out runs/imp_smoke.json      # tiny widths on CPU (CI)

Each config (default: imp_b16, then imp_moe_b16) trains for --steps steps with `launchers/torchrun.sh` on one
process, DeepSpeed ZeRO-2, bf16, on a generated shard set: the embedded demo's digits, spoken words and moving
digits (built by data_pipelines/demo_digits.py if missing), decoded at the config's sizes — 224 px images,
160 px x 8-frame videos and 10 s audio as its data.tasks say, so each task's tokens and FLOPs are those of the
real config; only the content is small. Every task keeps its batch size from the config unless --batch sets
the image-text batch (the other tasks scale with it).

From each run's metrics.jsonl (log steps after the first --skip steps): seconds per step, samples/s, MFU
(mmpt.train.throughput: 3 x the forward FLOPs of what each step ran, over the device's datasheet peak —
`--peak-tflops` or the table there; None on a CPU without it — and `mfu_probe` over a bf16 matmul probe),
peak CUDA memory, and the share of the step the loader kept the trainer waiting. `moe_over_dense` = MoE
s/step / dense s/step at equal active parameters per token (imp_moe_b16 vs imp_b16). Prints one JSON object
(and writes --out); the exit code is 1 when a config's training failed. Needs a source checkout: it trains
through launchers/torchrun.sh and builds missing demo shards with data_pipelines/demo_digits.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from mmpt.bench import count
from mmpt.config import load_config

REPO = Path(__file__).resolve().parents[2]  # the source checkout: launchers/ and data_pipelines/
TARGETS = {"mfu_dense_min": 0.45, "moe_over_dense_max": 1.2}
SMOKE = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=32", "model.decoder_layers=1",
         "model.decoder_cross_layers=1", "model.image_size=32", "model.patch_size=16", "model.context_length=16",
         "data.num_workers=1", "data.shuffle_buffer=16", "data.pin_memory=false", "deepspeed.bf16=false",
         "model.grad_checkpointing=false", "data.video={num_frames: 4, fps: null, window_seconds: null}",
         "data.audio={seconds: 1.0}", "model.video={num_frames: 4, tubelet: 2}",
         "model.audio={fbank_frames: 98, num_mel_bins: 128, patch: 16}", "model.moe.num_experts=4"]
SMOKE_TASKS = {"image-text": {"batch_size": 8}, "video-text": {"batch_size": 4, "image_size": 16, "num_frames": 4},
               "audio-text": {"batch_size": 8}, "video-audio": {"batch_size": 4, "image_size": 16, "num_frames": 4}}


def sources(data: Path) -> list:
    return [{"name": n, "shards": str(data / part), "modalities": pair, "weight": w} for n, part, pair, w in (
        ("image-text", "train", ["image", "text"], 4), ("video-text", "motion-train", ["video", "text"], 1),
        ("audio-text", "speech-train", ["audio", "text"], 1), ("video-audio", "motion-train", ["video", "audio"], 1))]


def overrides(args, name: str, out: Path) -> list:
    over = [f"data.sources={json.dumps(sources(args.data))}", f"data.val={args.data}/val",
            f"data.classes={args.data}/classes.json", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
            f"train.ckpt_every={10 ** 9}", f"train.out_dir={out}", "train.resume=false", "eval.every=0"]
    if args.peak_tflops:
        over.append(f"train.peak_tflops={args.peak_tflops}")
    if args.cpu_smoke:
        return over + SMOKE + [f"data.tasks={json.dumps(SMOKE_TASKS)}"]
    if args.batch:
        data = load_config(name).data
        tasks = data.tasks
        base = (tasks["image-text"].batch_size if "image-text" in tasks else None) or data.batch_size
        scaled = {k: {**_terms(v), "batch_size": max(1, round((v.batch_size or base) * args.batch / base))}
                  for k, v in tasks.items()}
        over += [f"data.batch_size={args.batch}", f"data.tasks={json.dumps(scaled)}"]
    return over + list(args.override)


def _terms(terms) -> dict:
    return {k: v for k, v in dataclasses.asdict(terms).items() if v is not None}


def summarize(out: Path, skip: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "samples_per_s" in r and r["step"] > skip] or [r for r in records if "loss" in r]
    if not steps:
        return {"error": f"no step records in {out / 'metrics.jsonl'}"}
    mean = lambda key: statistics.fmean(r[key] for r in steps if key in r) if any(key in r for r in steps) else None  # noqa: E731
    window = steps[1:] if len(steps) > 1 else steps
    span = (window[-1]["time"] - steps[0]["time"]) / (window[-1]["step"] - steps[0]["step"]) if len(steps) > 1 else None
    return {"log_records": len(steps), "s_per_step": span, "samples_per_s": mean("samples_per_s"),
            "mfu": mean("mfu"), "mfu_probe": mean("mfu_probe"), "model_tflops_per_s": mean("model_tflops_per_s"),
            "loader_wait_share": mean("loader_wait_share"),
            "cuda_peak_gib": max((r.get("cuda_peak_gib", 0.0) for r in steps), default=None),
            "tokens_per_s": {k.split("/", 1)[1]: mean(k) for k in steps[-1] if k.startswith("tokens_per_s/")},
            "final_loss": steps[-1].get("loss")}


def run_one(args, name: str) -> dict:
    out = args.workdir / name
    env = {**os.environ, "NPROC": "1", "MASTER_PORT": str(random.randint(20000, 40000)),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    cmd = ["launchers/torchrun.sh", "train", "--config", name, *overrides(args, name, out)]
    print(f"bench imp-scale: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=sys.stderr)  # stdout carries only the result JSON
    if proc.returncode:
        return {"command": cmd, "error": f"training exited with {proc.returncode}"}
    return {"command": cmd, **summarize(out, args.skip)}


def add_arguments(ap) -> None:
    ap.add_argument("--configs", nargs="+", default=["imp_b16", "imp_moe_b16"])
    ap.add_argument("--steps", type=count(1), default=300)
    ap.add_argument("--log-every", type=count(1), default=20)
    ap.add_argument("--skip", type=count(0), default=40, help="steps left out of the figures (warm-up, compilation)")
    ap.add_argument("--batch", type=count(1), help="image-text batch per GPU (other tasks scale with it)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak; default: mmpt.train.throughput.PEAKS")
    ap.add_argument("--data", type=Path, default=REPO / "data/demo")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs/imp_scale")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny widths, fp32, for a CPU check of this bench")
    ap.add_argument("--override", nargs="*", default=[], help="more dotted overrides for every config")


def main(args) -> dict:
    if not (REPO / "launchers" / "torchrun.sh").is_file():
        raise SystemExit(f"bench imp-scale: needs mmpt's source checkout (launchers/torchrun.sh), not {REPO}")
    if args.cpu_smoke:
        args.steps, args.log_every, args.skip = min(args.steps, 6), 2, 0
    if not (args.data / "train").is_dir():
        subprocess.run([sys.executable, "data_pipelines/demo_digits.py", "--out", str(args.data)], cwd=REPO,
                       check=True, stdout=sys.stderr)
    result = {"configs": {name: run_one(args, name) for name in args.configs}, "targets": TARGETS}
    runs = result["configs"]
    if runs.get("imp_b16", {}).get("s_per_step") and runs.get("imp_moe_b16", {}).get("s_per_step"):
        result["moe_over_dense"] = runs["imp_moe_b16"]["s_per_step"] / runs["imp_b16"]["s_per_step"]
    return result


def exit_code(result: dict) -> int:
    return 0 if all("error" not in r for r in result["configs"].values()) else 1
