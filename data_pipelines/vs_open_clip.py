"""Side by side with open_clip's own trainer: CoCa through `open_clip_train` and mmpt, same shards, same settings.

    python data_pipelines/vs_open_clip.py --out runs/vs_open_clip.json                      # 3 seeds, ~30 min
    python data_pipelines/vs_open_clip.py --steps 600 --batch 128 --out runs/vs_open_clip_600x128.json
    python data_pipelines/vs_open_clip.py --trunk dense --mmpt-override loss.init_temperature=0.05 --out x.json

Both sides train one image-text model on the same webdataset shards (default: the embedded demo digits,
`data/demo/train`; held-out `data/demo/val` and `data/demo/classes.json`), one process each, one after the
other, with the same thread count (`--threads`: torch.set_num_threads and OMP/MKL_NUM_THREADS), one data
loader worker each (`--workers`), fp32, and the same

- tokenizer: open_clip's BPE (49,408 tokens; the demo's own is a cut of it, clip-bpe-8k);
- model shape: width 128, depth 4, 4 heads, patch 8 on 32 px images, context 16, embedding 128, caption decoder
  of 1 causal + 1 cross-attending layer (open_clip: one multimodal layer = a causal block and a cross block);
- steps, batch, AdamW (lr, betas, eps, weight decay; no decay on biases, norms, temperatures), linear warm-up
  then cosine to 0 (open_clip's `cosine_lr` and mmpt's `lr_lambda` are the same function), gradient clipping
  at norm 1, contrastive and caption loss weights 1 and 1, temperature initialised at 0.07 (clamped at 100);
- shard sampling with replacement (open_clip `--dataset-resampled`; mmpt's streams are resampled).

open_clip side: a CoCa config registered with `open_clip.add_model_config` (two towers of 4 layers, attentional
pooler with 16 queries, appended text CLS token, 1 multimodal layer) and `open_clip_train.main.main([...])` run
in a fresh process, its own data path (`get_wds_dataset`, train transform RandomResizedCrop(0.9-1), bicubic),
loss (`CoCaLoss`), optimizer, scheduler and loop, as shipped. Two things are touched, neither numerical: the
loss object is wrapped to record each step's losses and time, and `tarfile_to_samples_nothrow` is webdataset's own
`tarfile_to_samples` (open_clip 3.3.0's copy fails on webdataset 1.0's end-of-shard markers; see
mmpt/bench/data.py). The model and the command line are in the result (`open_clip.argv`).

mmpt side: `mmpt train --config demo` with one source (the same shards, image-text only) and the overrides
in the result (`mmpt.overrides`), i.e. one shared trunk for both modalities; `--trunk moe` keeps the demo's MoE
(4 experts, top-1, in the last 2 layers, LIMoE entropy terms), `--trunk dense` makes every FFN dense. It runs
`mmpt.train.loop.train` (DeepSpeed engine, ZeRO as the demo, one gloo process), its loss wrapped the same way.

Time per step is measured the same way on both sides: each side's loss (open_clip's CoCaLoss, mmpt's
`objective`) is wrapped to take a wall-clock and a process-CPU timestamp when it is called, once per step after
the forward; s/step = (last mark - mark after `--timing-skip` steps) / steps between them. So it includes
everything the trainer does per step (waiting for the loader, forward, backward, clipping, optimizer,
scheduler, its logging) and excludes start-up (imports, model build, loader start, shuffle-buffer filling,
the first steps) and the final checkpoint. `cpu_s_per_step` is the trainer process's CPU time (not its loader
worker's) per step, less sensitive to other jobs on the machine; `wall_s` is the whole process for reference.

Zero-shot top-1 on the same held-out shards, same class names and prompt templates, each model with its own
eval preprocessing (open_clip: preprocess_val, bicubic resize + centre crop; mmpt: its eval decoder, bilinear
centre crop): open_clip's `build_zero_shot_classifier` for the open_clip checkpoint, mmpt's `run_zeroshot` for
mmpt's (both: per class, the normalised mean of its prompts' normalised embeddings; argmax of cosine).

Parameters and FLOPs: counted on each side's built model; FLOPs per sample with torch's FlopCounterMode
(matmuls, convolutions, attention) on a batch of `--batch` training captions and random images, for the image
encoder, the text encoder and the whole training forward (both encoders, caption decoder and its vocabulary
logits), plus mmpt's own `mmpt model info` figures.

Seeds (`--seeds`, default 0,1,2): each seed runs both sides, one after the other; `runs` holds each seed's
result and `summary` each side's mean, standard deviation, worst and best over the seeds, and each seed's ratio.
The target holds when the worst seed meets it.

Prints ONE JSON object (and writes it to --out). Work files (checkpoints, logs) go under --workdir.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "coca_mmpt_demo"  # "coca" in the name: open_clip_train picks CoCaLoss by it
TARGET = {"top1_ratio_min": 1.0, "time_per_step_ratio_max": 0.7}

# Both sides tokenize with open_clip's full BPE (the demo config's own is clip-bpe-8k, a cut of it).
OPEN_CLIP_BPE = {"data.tokenizer": "openclip", "model.vocab_size": 49408, "model.sot_id": 49406,
                 "model.eot_id": 49407}


# ---- settings shared by both sides ------------------------------------------------------------------

def shape_from_demo() -> dict:
    """The demo config's image-text model shape (mmpt/configs/demo.yaml), read, not copied."""
    from mmpt.config import load_config

    m = load_config("demo").model
    return {"width": m.width, "depth": m.depth, "heads": m.heads, "mlp_ratio": m.mlp_ratio, "patch_size": m.patch_size,
            "image_size": m.image_size, "context_length": m.context_length, "embed_dim": m.embed_dim,
            "vocab_size": OPEN_CLIP_BPE["model.vocab_size"], "decoder_layers": m.decoder_layers,
            "decoder_cross_layers": m.decoder_cross_layers}


def shard_urls(spec: str) -> list:
    from mmpt.data.shards import list_shards

    return [str(Path(u).resolve()) if "://" not in u and not u.startswith("pipe:") else u for u in list_shards(spec)]


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
        from mmpt.bench.data import OPEN_CLIP_CROP

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


# ---- what both sides do the same way -----------------------------------------------------------------

class StepRecorder:
    """Called by each side's loss, once per training step, after the forward: a wall-clock and a process-CPU
    timestamp and the step's scalar losses. The same point of the step on both sides, so the intervals between
    marks are whole steps (backward, optimizer, the wait for the next batch, the next forward)."""

    def __init__(self):
        self.wall: list = []
        self.cpu: list = []
        self.losses: list = []

    def mark(self, losses: dict) -> None:
        import torch

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
    import torch

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


def sample_batch(train_urls: list, n: int) -> tuple:
    """n captions of the training shards (for FLOP counting) and n random 3x32x32-shaped images' sizes."""
    import webdataset as wds

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


# ---- open_clip side ------------------------------------------------------------------------------------

def run_open_clip(s: dict) -> dict:
    import open_clip
    import open_clip_train.data as oc_data
    import open_clip_train.main as oc_main
    import torch
    import webdataset as wds

    from mmpt.bench.step import open_clip_config

    set_threads(s["threads"])
    work = Path(s["workdir"])
    cfg_path = work / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(open_clip_config(s["shape"]), indent=1))
    open_clip.add_model_config(cfg_path)
    # open_clip 3.3.0's tarfile_to_samples_nothrow fails on webdataset 1.0's end-of-shard markers (KeyError
    # 'fname'); its comment says it re-implements wds.tarfile_to_samples: use that one (as mmpt/bench/data.py).
    oc_data.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=oc_data.log_and_continue)

    rec = StepRecorder()
    make_loss = oc_main.create_loss

    def recording_loss(args):
        inner = make_loss(args)

        class Recording(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, **kw):
                out = self.inner(**kw)
                rec.mark({**out, "loss": sum(out.values()), "logit_scale": kw["logit_scale"]})
                return out

        return Recording()

    oc_main.create_loss = recording_loss
    info = describe_open_clip(s)
    start = time.perf_counter()
    rc = oc_main.main(open_clip_argv(s))
    wall = time.perf_counter() - start
    if rc not in (None, 0):
        raise SystemExit(f"open_clip_train.main returned {rc}")
    ckpt = work / "open_clip" / "run" / "checkpoints" / "epoch_1.pt"
    model, _, preprocess_val = open_clip.create_model_and_transforms(MODEL_NAME, precision="fp32")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    zs = open_clip_zeroshot(model, preprocess_val, s)
    return {**info, "argv": ["python", "-m", "open_clip_train.main", *open_clip_argv(s)],
            "model_config": open_clip_config(s["shape"]), "steps": len(rec.losses),
            "timing": rec.timing(s["timing_skip"]), "wall_s": wall, "losses": loss_summary(rec.losses),
            "logit_scale_final": float(model.logit_scale.detach().exp()), "zeroshot": zs}


def describe_open_clip(s: dict) -> dict:
    import open_clip
    import torch

    from mmpt.bench.common import count_flops

    with contextlib.redirect_stdout(sys.stderr):
        model, preprocess_train, _ = open_clip.create_model_and_transforms(MODEL_NAME, precision="fp32")
    tok = open_clip.get_tokenizer(MODEL_NAME)
    model.train()
    b = s["batch"]
    texts = tok(sample_batch(s["train_urls"], b))
    images = torch.randn(b, 3, s["shape"]["image_size"], s["shape"]["image_size"])
    tables = [model.text.token_embedding.weight, model.text_decoder.text_projection]
    return {"params": param_counts(model, tables),
            "flops_per_sample": {"image_encoder": count_flops(lambda: model.encode_image(images)) / b,
                                 "text_encoder": count_flops(lambda: model.encode_text(texts)) / b,
                                 "train_forward": count_flops(lambda: model(images, texts)) / b},
            "tokenizer": f"{type(tok).__name__} (open_clip's bundled BPE)",
            "augment": " ".join(repr(preprocess_train).split())}


def open_clip_zeroshot(model, preprocess, s: dict) -> dict:
    import open_clip
    import torch
    import webdataset as wds

    classes = json.loads(Path(s["classes"]).read_text())
    tok = open_clip.get_tokenizer(MODEL_NAME)
    model.eval()
    hits = n = 0
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tok, classes["classnames"], classes["templates"],
                                                          num_classes_per_batch=None, device="cpu")
        data = (wds.WebDataset(s["val_urls"], shardshuffle=False, empty_check=False).decode("pilrgb")
                .to_tuple("jpg;png;jpeg;webp", "json").map_tuple(preprocess, lambda j: int(j["label"]))
                .batched(256, partial=True))
        for images, labels in data:
            pred = (model.encode_image(images, normalize=True) @ classifier).argmax(-1)
            hits += int((pred == torch.as_tensor(labels)).sum())
            n += len(labels)
    return {"top1": hits / max(1, n), "num_samples": n, "templates": len(classes["templates"]),
            "how": "open_clip.build_zero_shot_classifier + preprocess_val"}


# ---- mmpt side -----------------------------------------------------------------------------------------

def run_mmpt(s: dict) -> dict:
    import mmpt.train.engine as engine
    import mmpt.train.loop as loop
    from mmpt.config import load_config
    from mmpt.eval.zeroshot import run_zeroshot
    from mmpt.hub import load_model
    from mmpt.model.info import model_info

    set_threads(s["threads"])
    cfg = load_config("demo", mmpt_overrides(s))
    info = describe_mmpt(cfg, s)
    info["model_info"] = model_info(cfg)
    info["augment"] = mmpt_augment(cfg)
    rec = StepRecorder()
    objective = engine.objective

    def recording_objective(*args, **kwargs):
        out = objective(*args, **kwargs)
        rec.mark(out)
        return out

    engine.objective = recording_objective  # what TrainModule.forward calls, once per step
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        loop.train(cfg)
    wall = time.perf_counter() - start
    model, run_cfg = load_model(cfg.train.out_dir)
    with contextlib.redirect_stdout(sys.stderr):
        zs = run_zeroshot(model, run_cfg, "image", data=s["val"], classes=s["classes"])
    pair = "image-text"
    return {**info, "overrides": mmpt_overrides(s),
            "command": "mmpt train --config demo " + " ".join(f"'{o}'" for o in mmpt_overrides(s)),
            "trunk": s["trunk"], "steps": len(rec.losses), "timing": rec.timing(s["timing_skip"]), "wall_s": wall,
            "losses": loss_summary(rec.losses), "logit_scale_final": float(model.logit_scale(pair).detach()),
            "zeroshot": {"top1": zs["top1"], "num_samples": zs["num_samples"], "templates": zs["templates"],
                         "how": "mmpt.eval.zeroshot.run_zeroshot (mmpt eval zeroshot)"}}


def mmpt_augment(cfg):
    """The image augmentation mmpt's training stream applies to the source."""
    from mmpt.config import source_augment

    return dataclasses.asdict(source_augment(cfg, 0).image)


def describe_mmpt(cfg, s: dict) -> dict:
    import torch

    from mmpt.bench.common import count_flops
    from mmpt.data.tokenizer import tokenize
    from mmpt.losses import objective
    from mmpt.model import build_for_run

    torch.manual_seed(0)
    model = build_for_run(cfg)
    model.train()
    b = s["batch"]
    texts = tokenize(sample_batch(s["train_urls"], b), cfg.model.context_length, cfg.data.tokenizer)
    images = torch.randn(b, 3, cfg.model.image_size, cfg.model.image_size)
    tables = [model.stems["text"].token.weight, model.decoder.token.weight]
    return {"params": param_counts(model, tables),
            "flops_per_sample": {"image_encoder": count_flops(lambda: model.encode("image", images)) / b,
                                 "text_encoder": count_flops(lambda: model.encode("text", texts)) / b,
                                 "train_forward": count_flops(lambda: objective(model({"image": images,
                                                                                       "text": texts}),
                                                                                cfg.loss)) / b},
            "tokenizer": f"{cfg.data.tokenizer} (open_clip's bundled BPE)"}


# ---- driver -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_side(side: str, s: dict) -> dict:
    """One side in a fresh process (nothing of one trainer's imports or global state reaches the other)."""
    work = Path(s["workdir"])
    spec, result = work / f"{side}.settings.json", work / f"{side}.result.json"
    spec.write_text(json.dumps(s))
    result.unlink(missing_ok=True)
    shutil.rmtree(work / side, ignore_errors=True)  # a fresh run: no resuming from an earlier invocation's files
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    n = str(s["threads"])
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    print(f"vs_open_clip: {side} side ({s['steps']} steps of {s['batch']})", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", side, "--settings", str(spec)],
                          env=env, cwd=str(REPO), stdout=sys.stderr, stderr=None)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"vs_open_clip: the {side} side failed (exit {proc.returncode}); its log is above")
    # Other jobs on the machine slow a side down: the 1-minute load average before and after it says how busy.
    return {**json.loads(result.read_text()), "load_average_1min": [load_before[0], os.getloadavg()[0]]}


def child(side: str, settings: str) -> int:
    s = json.loads(Path(settings).read_text())
    out = run_open_clip(s) if side == "open_clip" else run_mmpt(s)
    Path(settings).with_name(f"{side}.result.json").write_text(json.dumps(out))
    return 0


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
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default="data/demo/train", help="training shards (dir with sizes.json, brace pattern)")
    ap.add_argument("--val", default="data/demo/val", help="held-out labelled shards for zero-shot")
    ap.add_argument("--classes", default="data/demo/classes.json", help='{"classnames": [...], "templates": [...]}')
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.98)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side (one process each)")
    ap.add_argument("--workers", type=int, default=1, help="data loader worker processes of each side")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each runs both sides (default 0,1,2)")
    ap.add_argument("--trunk", choices=["moe", "dense"], default="moe",
                    help="mmpt's trunk: the demo's (MoE in the last 2 layers) or every FFN dense")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0,
                    help="mmpt's DeepSpeed ZeRO stage: 0 for one process (nothing to partition; the demo's 2 costs "
                         "a flat-buffer copy of every gradient and parameter per step)")
    ap.add_argument("--augment", choices=["same", "demo"], default="same",
                    help="mmpt's image augmentation: open_clip's RandomResizedCrop(0.9-1) (same), or the demo config's")
    ap.add_argument("--sides", choices=["both", "mmpt", "open_clip"], default="both")
    ap.add_argument("--timing-skip", type=int, help="first steps left out of s/step (default max(5, steps/10))")
    ap.add_argument("--mmpt-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra mmpt dotted override, applied last (repeatable), e.g. loss.init_temperature=0.05")
    ap.add_argument("--open-clip-arg", action="append", default=[], metavar="ARG",
                    help="extra open_clip_train argument, appended (repeatable; '--open-clip-arg=--wd=0.2')")
    ap.add_argument("--workdir", help="checkpoints and logs (default: a temp dir, removed after)")
    ap.add_argument("--out", help="write the JSON result here too")
    ap.add_argument("--side", choices=["mmpt", "open_clip"], help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side is None and min(args.steps, args.batch, args.threads) < 1:
        ap.error("--steps, --batch and --threads must be >= 1")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        return child(args.side, args.settings)
    sys.path.insert(0, str(REPO))
    temp = None if args.workdir else tempfile.mkdtemp(prefix="vs_open_clip_")
    work = Path(args.workdir or temp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        s = {"train": str(Path(args.train).resolve()), "val": str(Path(args.val).resolve()),
             "classes": str(Path(args.classes).resolve()), "steps": args.steps, "batch": args.batch,
             "lr": args.lr, "warmup": args.warmup, "wd": args.wd, "beta1": args.beta1, "beta2": args.beta2,
             "eps": args.eps, "grad_clip": args.grad_clip, "schedule": "linear warm-up, cosine to 0",
             "precision": "fp32", "threads": args.threads, "workers": args.workers,
             "trunk": args.trunk, "augment": args.augment, "zero_stage": args.zero_stage,
             "timing_skip": timing_skip(args.steps, args.timing_skip),
             "loss_weights": {"contrastive": 1.0, "caption": 1.0}, "init_temperature": 0.07,
             "mmpt_overrides": args.mmpt_override, "open_clip_args": args.open_clip_arg,
             "workdir": str(work), "shape": shape_from_demo(), "host_cpus": os.cpu_count()}
        s["train_urls"], s["val_urls"] = shard_urls(s["train"]), shard_urls(s["val"])
        order = ["open_clip", "mmpt"] if args.sides == "both" else [args.sides]
        runs = []
        for seed in args.seeds:
            seeded = {**s, "seed": seed}
            runs.append(compare(seeded, {side: run_side(side, seeded) for side in order}))
        result = {"bench": "vs_open_clip", "runs": runs, "summary": summarize(runs)}
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
