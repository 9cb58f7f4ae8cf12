"""Whole training steps, mmpt against open_clip's CoCa trainer, on the same image-text batches, in one process.

    mmpt bench step --json                 # the demo shape, batch 32, open_clip's full BPE on both sides
    mmpt bench step --shape b16 --size 8   # ViT-B/16 width and depth (slow on CPU: a few steps)

What one step is on each side:
- mmpt: `mmpt.train.loop.train_step` on a DeepSpeed engine (one gloo process), the function the training loop
  runs. Headline at ZeRO stage 0, what one process needs (ZeRO partitions nothing across one rank and on CPU
  its flattening costs ~20% of this step); `mmpt_moe_zero2` is the same step under ZeRO-2, the demo's setting.
  The step: forward of the shared trunk (MoE as the demo config, or dense), contrastive + caption +
  MoE losses, backward, gradient clipping, AdamW, LR schedule. Images enter as uint8 and are normalised in
  the step, as in training.
- open_clip: `open_clip_train.train.train_one_epoch` itself, over the same batches (already normalised
  float32, as its loader hands them out): CoCa forward, `CoCaLoss`, backward, clipping, AdamW with
  open_clip's parameter groups, its cosine schedule and logit-scale clamp, args from its own parser.

Both: the same width, depth, heads, MLP ratio, patch, image size, context length, embedding width, caption
decoder depth (one causal + one cross-attending layer), tokenizer (open_clip's 49,408-token BPE), fp32, the
same thread count, the same batches. What differs by design: open_clip has two towers and an attentional
pooler; mmpt one shared trunk. Their FLOPs per sample are reported (torch's FlopCounterMode on one forward).

Time: wall time of `steps` steps after `warmup` untimed ones, samples/s = batch x steps / time. Memory: bytes of
the tensors a step creates that are live at its worst moment (mmpt.bench.common.PeakMemory; parameters and
optimizer state allocated before the step are not counted), one extra untimed step each. Prints one JSON
object; `vs_open_clip` = mmpt samples/s / open_clip samples/s (target >= 1.5; `vs_open_clip_zero2` under
ZeRO-2), `moe_over_dense` = mmpt's MoE step time / its dense step time, `compiled_over_eager` = the s/step of
the same ZeRO-0 MoE step with train.compile=true over eager's (compile_comparison: steps interleaved on the same
batches after the same warm-up steps), with `compile_s` (the compiled side's warm-up over eager's: compilation,
cold or from inductor's cache) reported apart.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from mmpt.bench import count, given
from mmpt.bench.common import count_flops, peak_mb
from mmpt.config import load_config
from mmpt.distributed import init_distributed, shutdown_distributed
from mmpt.modalities.image import pixels_to_float
from mmpt.model import build_for_run
from mmpt.train.engine import TrainModule, build_engine
from mmpt.train.loop import train_step

TARGET = 1.5
COMPILE_TARGET = 0.9  # train.compile's s/step over eager's (issue 23)
SHAPES = {  # shared by both sides; demo = mmpt/configs/demo.yaml's image-text shape
    "demo": {"width": 128, "depth": 4, "heads": 4, "mlp_ratio": 4.0, "patch_size": 8, "image_size": 32,
             "context_length": 16, "embed_dim": 128, "decoder_layers": 1, "decoder_cross_layers": 1},
    "b16": {"width": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224,
            "context_length": 32, "embed_dim": 512, "decoder_layers": 1, "decoder_cross_layers": 1},
}
BPE = {"vocab_size": 49408, "sot_id": 49406, "eot_id": 49407}
WORDS = "zero one two three four five six seven eight nine".split()
OC_NAME = "coca_mmpt_bench_step"


def make_batches(shape: dict, batch: int, n: int, seed: int = 0) -> list:
    """n batches of (uint8 images, open_clip-tokenized captions): smooth random images, digit captions."""
    import open_clip

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=shape["context_length"])
    size = shape["image_size"]
    out = []
    for _ in range(n):
        low = torch.randint(0, 256, (batch, 3, 4, 4), generator=g).float()
        images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").round().to(torch.uint8)
        caps = [f"a photo of the number {rng.choice(WORDS)} written by hand" for _ in range(batch)]
        out.append((images, tok(caps)))
    return out


# ---- open_clip -----------------------------------------------------------------------------------------------

def open_clip_config(shape: dict) -> dict:
    """open_clip's CoCa of the same shape as mmpt's model: separate towers of `depth` layers, one multimodal layer
    (a causal and a cross-attending block); the attentional pooler has a query per image patch, one of whose
    outputs is the contrastive embedding and all of them the decoder's context (mmpt: the patch tokens).
    Shared with `mmpt bench parity`."""
    w, h, vocab = shape["width"], shape["heads"], shape.get("vocab_size", BPE["vocab_size"])
    return {
        "embed_dim": shape["embed_dim"],
        "vision_cfg": {"image_size": shape["image_size"], "layers": shape["depth"], "width": w, "head_width": w // h,
                       "mlp_ratio": shape["mlp_ratio"], "patch_size": shape["patch_size"], "attentional_pool": True,
                       "attn_pooler_queries": (shape["image_size"] // shape["patch_size"]) ** 2,
                       "attn_pooler_heads": h, "output_tokens": True},
        "text_cfg": {"context_length": shape["context_length"], "vocab_size": vocab, "width": w, "heads": h,
                     "layers": shape["depth"], "mlp_ratio": shape["mlp_ratio"], "embed_cls": True,
                     "output_tokens": True},
        "multimodal_cfg": {"context_length": shape["context_length"], "vocab_size": vocab, "width": w, "heads": h,
                           "layers": shape["decoder_cross_layers"], "mlp_ratio": shape["mlp_ratio"],
                           "attn_pooler_heads": h},
        "custom_text": True,
    }


class ListLoader:
    """What train_one_epoch reads of a loader: iteration, num_batches, num_samples."""

    def __init__(self, batches: list):
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)

    def __iter__(self):
        return iter(self.batches)


def open_clip_side(shape: dict, batch: int, batches: list, warmup: int) -> dict:
    import open_clip
    from open_clip_train.data import DataInfo
    from open_clip_train.main import create_loss
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{OC_NAME}.json"
        path.write_text(json.dumps(open_clip_config(shape)))
        open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(OC_NAME, precision="fp32")
    args = parse_args(["--model", OC_NAME, "--batch-size", str(batch), "--precision", "fp32", "--lr", "3e-4",
                       "--wd", "0.1", "--grad-clip-norm", "1", "--warmup", "50", "--log-every-n-steps", "1000000",
                       "--coca-contrastive-loss-weight", "1", "--coca-caption-loss-weight", "1"])
    # what open_clip_train.main sets after parsing, for one CPU process
    args.device, args.world_size, args.rank, args.local_rank = "cpu", 1, 0, 0
    args.distributed, args.distill = False, False
    args.wandb, args.tensorboard = False, False
    # open_clip_train.main's parameter groups: no decay on gains, biases, norms and the logit scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": args.wd}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    total = len(batches) * 2
    scheduler = cosine_lr(opt, args.lr, args.warmup, total)
    loss = create_loss(args)
    data = [(pixels_to_float(im, torch.float32), txt) for im, txt in batches]

    def run(part: list, epoch: int) -> None:
        train_one_epoch(model, {"train": DataInfo(ListLoader(part))}, loss, epoch, opt, None, scheduler, None, args)

    run(data[:warmup], 0)
    start = time.perf_counter()
    run(data[warmup:], 1)
    seconds = time.perf_counter() - start
    memory = peak_mb(lambda: run(data[:1], 2))
    flops = count_flops(lambda: model(data[0][0], data[0][1])) / batch
    return _side(seconds, len(data) - warmup, batch, memory, model, flops,
                 "open_clip_train.train.train_one_epoch (CoCa, CoCaLoss, AdamW, cosine_lr)")


# ---- mmpt ---------------------------------------------------------------------------------------------------

def mmpt_config(shape: dict, batch: int, trunk: str, stage: int, compiled: bool = False):

    over = [f"model.{k}={v}" for k, v in {**shape, **BPE}.items()]
    over += ["data.tokenizer=openclip", "model.modalities=[image, text]",
             "data.sources=[{name: pairs, shards: unused, modalities: [image, text]}]", f"data.batch_size={batch}",
             "optim.lr=3e-4", "optim.warmup_steps=50", "loss.contrastive_weight=1.0", "loss.caption_weight=1.0",
             f"deepspeed.zero_stage={stage}", "eval.every=0", f"train.compile={str(compiled).lower()}"]
    if trunk == "dense":
        over.append("model.moe.num_experts=0")
    return load_config("demo", over)


def mmpt_side(shape: dict, batch: int, batches: list, warmup: int, trunk: str, stage: int) -> dict:

    cfg = mmpt_config(shape, batch, trunk, stage)
    torch.manual_seed(0)
    model = build_for_run(cfg)
    engine = build_engine(TrainModule(model, cfg.loss), cfg, 1)
    modalities = ["image", "text"]
    data = [{"image": im, "text": txt} for im, txt in batches]

    def run(part: list) -> None:
        for b in part:
            train_step(engine, modalities, [b], cfg)

    run(data[:warmup])
    start = time.perf_counter()
    run(data[warmup:])
    seconds = time.perf_counter() - start
    memory = peak_mb(lambda: run(data[:1]))
    flops = count_flops(lambda: model({"image": data[0]["image"], "text": data[0]["text"]})) / batch
    return _side(seconds, len(data) - warmup, batch, memory, model, flops,
                 f"mmpt.train.loop.train_step on a DeepSpeed ZeRO-{stage} engine ({trunk} trunk)")


def compile_comparison(shape: dict, batch: int, batches: list, warmup: int, stage: int = 0,
                       trunk: str = "moe") -> dict:
    """The demo's step (`trunk`, ZeRO `stage`) eager and with train.compile, two engines from the same initial
    weights taking the same batches, their steps interleaved (eager, compiled, eager, ...) so that the machine's
    drift falls on both alike. compile_s: the compiled engine's warm-up steps' time over eager's; losses: each
    engine's loss at every step, warm-up included."""
    engines, cfgs = [], []
    for compiled in (False, True):
        cfgs.append(mmpt_config(shape, batch, trunk, stage, compiled))
        torch.manual_seed(0)
        engines.append(build_engine(TrainModule(build_for_run(cfgs[-1]), cfgs[-1].loss), cfgs[-1], 1))
    data = [{"image": im, "text": txt} for im, txt in batches]
    spent = {"warmup": [0.0, 0.0], "timed": [0.0, 0.0]}
    losses: list = [[], []]
    for i, b in enumerate(data):
        for side in (0, 1):
            began = time.perf_counter()
            losses[side].append(train_step(engines[side], ["image", "text"], [b], cfgs[side])["loss"].item())
            spent["warmup" if i < warmup else "timed"][side] += time.perf_counter() - began
    steps = len(data) - warmup
    return {"how": f"the mmpt_{trunk} step (ZeRO-{stage}) eager and with train.compile=true (each Transformer block "
                   "and the caption loss compiled by torch.compile, inductor), steps interleaved",
            "steps": steps, "eager_s_per_step": spent["timed"][0] / steps,
            "compiled_s_per_step": spent["timed"][1] / steps,
            "compile_s": spent["warmup"][1] - spent["warmup"][0],
            "max_loss_difference": max(abs(a - b) for a, b in zip(*losses, strict=True)),
            "losses": {"eager": losses[0], "compiled": losses[1]}}


# ---- both ----------------------------------------------------------------------------------------------------

def _side(seconds: float, steps: int, batch: int, memory: float, model, flops: float, how: str) -> dict:
    return {"how": how, "steps": steps, "s_per_step": seconds / steps, "samples_per_s": batch * steps / seconds,
            "peak_step_mb": memory, "parameters": sum(p.numel() for p in model.parameters()),
            "forward_flops_per_sample": flops}


def run(shape: str = "demo", size: int | None = None, steps: int | None = None, threads: int = 2) -> dict:

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: one of {', '.join(SHAPES)}")
    batch = size or (32 if shape == "demo" else 8)
    steps = steps or (20 if shape == "demo" else 3)
    warmup = 3 if shape == "demo" else 1
    torch.set_num_threads(threads)
    init_distributed()  # DeepSpeed needs a process group: one local gloo rank
    dims = SHAPES[shape]
    batches = make_batches(dims, batch, warmup + steps)
    with contextlib.redirect_stdout(None):
        oc = open_clip_side(dims, batch, batches, warmup)
        moe = mmpt_side(dims, batch, batches, warmup, "moe", 0)
        dense = mmpt_side(dims, batch, batches, warmup, "dense", 0)
        zero2 = mmpt_side(dims, batch, batches, warmup, "moe", 2)
        compiled = compile_comparison(dims, batch, batches, warmup)
    shutdown_distributed()
    ratio = moe["samples_per_s"] / oc["samples_per_s"]
    return {"bench": "step", "shape": shape, **dims, "batch": batch, "timed_steps": steps, "warmup_steps": warmup,
            "threads": threads, "dtype": "float32", "tokenizer": "open_clip BPE (49,408)",
            "mmpt_moe": moe, "mmpt_dense": dense, "mmpt_moe_zero2": zero2, "open_clip": oc,
            "vs_open_clip": ratio, "vs_open_clip_dense": dense["samples_per_s"] / oc["samples_per_s"],
            "vs_open_clip_zero2": zero2["samples_per_s"] / oc["samples_per_s"],
            "moe_over_dense": moe["s_per_step"] / dense["s_per_step"],
            "compile": compiled, "compiled_over_eager": compiled["compiled_s_per_step"] / compiled["eager_s_per_step"],
            "compile_s": compiled["compile_s"],
            "target": {"vs_open_clip_min": TARGET, "compiled_over_eager_max": COMPILE_TARGET},
            "meets_target": bool(math.isfinite(ratio) and ratio >= TARGET)}


def add_arguments(parser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), help="the model shape both sides share (default demo)")
    parser.add_argument("--size", type=count(1), help="batch size (default 32 for demo, 8 for b16)")
    parser.add_argument("--steps", type=count(1), help="timed steps per side (default 20 for demo, 3 for b16)")


def main(args) -> dict:
    return run(**given(args, "shape", "size", "steps"))
