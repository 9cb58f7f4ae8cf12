"""What both sides of `mmpt bench parity` share: the settings each trainer is given, the per-step recorder and
the summaries of losses, parameters and batches. Each side runs in its own process (`child`)."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds

from mmpt.bench.data import OPEN_CLIP_CROP
from mmpt.config import load_config
from mmpt.data.shards import list_shards

MODEL_NAME = "coca_mmpt_demo"  # "coca" in the name: open_clip_train picks CoCaLoss by it

# Both sides tokenize with open_clip's full BPE (the demo config's own is clip-bpe-8k, a cut of it).
OPEN_CLIP_BPE = {"data.tokenizer": "openclip", "model.vocab_size": 49408, "model.sot_id": 49406,
                 "model.eot_id": 49407}


def shape_from_demo() -> dict:
    """The demo config's image-text model shape (mmpt/configs/demo.yaml), read, not copied."""
    m = load_config("demo").model
    return {"width": m.width, "depth": m.depth, "heads": m.heads, "mlp_ratio": m.mlp_ratio, "patch_size": m.patch_size,
            "image_size": m.image_size, "context_length": m.context_length, "embed_dim": m.embed_dim,
            "vocab_size": OPEN_CLIP_BPE["model.vocab_size"], "decoder_layers": m.decoder_layers,
            "decoder_cross_layers": m.decoder_cross_layers}


def shard_urls(pattern: str) -> list:
    return [str(Path(u).resolve()) if "://" not in u and not u.startswith("pipe:") else u for u in list_shards(pattern)]


def timing_skip(steps: int, asked: int | None) -> int:
    skip = max(5, steps // 10) if asked is None else asked
    return max(0, min(skip, steps - 2))


def mmpt_overrides(s: dict) -> list:
    over = [
        "data.sources=" + json.dumps([{"name": "pairs", "shards": s["train"], "modalities": ["image", "text"],
                                       "weight": 1.0}]),
        f"data.val={s['val']}", f"data.classes={s['classes']}",
        f"data.batch_size={s['batch']}", f"data.num_workers={s['workers']}",
        "model.modalities=[image, text]", *(f"{k}={v}" for k, v in OPEN_CLIP_BPE.items()),
        f"optim.lr={s['lr']}", f"optim.warmup_steps={s['warmup']}", f"optim.weight_decay={s['wd']}",
        f"optim.betas=[{s['beta1']}, {s['beta2']}]", f"optim.eps={s['eps']}", f"optim.grad_clip={s['grad_clip']}",
        "loss.contrastive_weight=1.0", "loss.caption_weight=1.0", "loss.init_temperature=0.07",
        "loss.max_logit_scale=100.0",
        f"train.steps={s['steps']}", f"train.ckpt_every={s['steps']}", "train.keep_checkpoints=1",
        f"train.out_dir={s['workdir']}/mmpt", "train.resume=false", f"train.seed={s['seed']}",
        "eval.every=0", f"deepspeed.zero_stage={s['zero_stage']}",
    ]
    if s["trunk"] == "dense":
        over.append("model.moe.num_experts=0")
    if s["augment"] == "same":
        # open_clip's training crop (mmpt.bench.data.OPEN_CLIP_CROP); mmpt resamples bilinear, open_clip bicubic:
        # the one difference left
        over.append("data.augment=" + json.dumps({"image": OPEN_CLIP_CROP}))
    return over + list(s["mmpt_overrides"])


def open_clip_argv(s: dict) -> list:
    argv = [
        "--model", MODEL_NAME, "--dataset-type", "webdataset", "--dataset-resampled",
        "--train-data", "::".join(s["train_urls"]), "--train-num-samples", str(s["steps"] * s["batch"]),
        "--epochs", "1", "--batch-size", str(s["batch"]), "--workers", str(s["workers"]),
        "--lr", str(s["lr"]), "--warmup", str(s["warmup"]), "--lr-scheduler", "cosine", "--wd", str(s["wd"]),
        "--beta1", str(s["beta1"]), "--beta2", str(s["beta2"]), "--eps", str(s["eps"]),
        "--grad-clip-norm", str(s["grad_clip"]),
        "--coca-contrastive-loss-weight", "1", "--coca-caption-loss-weight", "1",
        "--precision", "fp32", "--device", "cpu", "--seed", str(s["seed"]),
        "--logs", f"{s['workdir']}/open_clip", "--name", "run", "--report-to", "",
        "--save-frequency", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--log-every-n-steps", "50",
    ]
    return argv + list(s["open_clip_args"])


class StepRecorder:
    """Called by each side's loss, once per training step, after the forward: a wall-clock and a process-CPU
    timestamp and the step's scalar losses. The same point of the step on both sides, so the intervals between
    marks are whole steps (backward, optimizer, the wait for the next batch, the next forward)."""

    def __init__(self):
        self.wall: list = []
        self.cpu: list = []
        self.losses: list = []

    def mark(self, losses: dict) -> None:
        self.losses.append({k: float(v.detach()) for k, v in losses.items()
                            if torch.is_tensor(v) and v.numel() == 1 and not k.startswith("moe/")})
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def timing(self, skip: int) -> dict:
        t, c = self.wall, self.cpu
        if len(t) < 2:
            return {"marked_steps": len(t), "s_per_step": None}
        skip = min(skip, len(t) - 2)
        n = len(t) - 1 - skip
        intervals = [b - a for a, b in zip(t[:-1], t[1:], strict=True)]
        return {"marked_steps": len(t), "timed_steps": n, "s_per_step": (t[-1] - t[skip]) / n,
                "median_s_per_step": statistics.median(intervals[skip:]),
                "cpu_s_per_step": (c[-1] - c[skip]) / n,
                "first_steps_s": [round(x, 3) for x in intervals[:skip]]}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def loss_summary(losses: list) -> dict:
    """losses: [{name: float}] per step -> first/last and means of the first and last tenth."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    out = {}
    for name in losses[0]:
        vals = [step[name] for step in losses if name in step]
        out[name] = {"first": vals[0], "last": vals[-1], "mean_first_10pct": statistics.fmean(vals[:k]),
                     "mean_last_10pct": statistics.fmean(vals[-k:]),
                     "finite": all(math.isfinite(v) for v in vals)}
    return out


def sample_batch(train_urls: list, n: int) -> list:
    """n captions of the training shards (for FLOP counting), repeated when the shards hold fewer."""
    texts = []
    for sample in wds.WebDataset(train_urls, shardshuffle=False, empty_check=False):
        if "txt" in sample:
            texts.append(sample["txt"].decode("utf-8"))
        if len(texts) == n:
            break
    while len(texts) < n:
        texts += texts[: n - len(texts)]
    return texts


def param_counts(model, embedding_tables: list) -> dict:
    total = sum(p.numel() for p in model.parameters())
    emb = sum(t.numel() for t in embedding_tables)
    return {"total": total, "vocabulary_tables": emb, "without_vocabulary_tables": total - emb}


def result_path(settings: Path, side: str) -> Path:
    return settings.with_name(f"{side}.result.json")


def child(side: str, run_side: Callable[[dict], dict]) -> int:
    """A side's process: `python -m mmpt.bench.parity_<side> SETTINGS` reads the settings JSON the driver wrote
    and leaves its result beside it (stdout is the training's log, not the result)."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m mmpt.bench.parity_{side} SETTINGS_JSON (started by mmpt bench parity)")
    settings = Path(sys.argv[1])
    out = run_side(json.loads(settings.read_text()))
    result_path(settings, side).write_text(json.dumps(out))
    return 0
