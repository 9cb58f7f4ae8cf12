"""The mmpt side of `mmpt bench parity`: `mmpt.train.loop.train` on --mmpt-config (the demo's by default)
with one image-text source, its objective wrapped to record each step, then `run_zeroshot`. Run as
`python -m mmpt.bench.parity_mmpt SETTINGS` by the driver, in a process of its own."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import torch

import mmpt.train.engine as engine
import mmpt.train.loop as loop
from mmpt.bench.common import count_flops
from mmpt.bench.parity_common import (
    StepRecorder,
    child,
    loss_summary,
    mmpt_overrides,
    param_counts,
    sample_batch,
    set_threads,
)
from mmpt.config import load_config, source_augment
from mmpt.data.tokenizer import tokenize
from mmpt.eval.zeroshot import run_zeroshot
from mmpt.hub import load_model
from mmpt.losses import objective
from mmpt.model import build_for_run
from mmpt.model.info import model_info


def run_mmpt(s: dict) -> dict:
    set_threads(s["threads"])
    cfg = load_config(s["mmpt_config"], mmpt_overrides(s))
    info = describe_mmpt(cfg, s)
    info["model_info"] = model_info(cfg)
    info["augment"] = mmpt_augment(cfg)
    rec = StepRecorder()
    inner = engine.objective

    def recording_objective(*args, **kwargs):
        out = inner(*args, **kwargs)
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
            "command": f"mmpt train --config {s['mmpt_config']} " + " ".join(f"'{o}'" for o in mmpt_overrides(s)),
            "trunk": s["trunk"], "steps": len(rec.losses), "timing": rec.timing(s["timing_skip"]), "wall_s": wall,
            "losses": loss_summary(rec.losses), "logit_scale_final": float(model.logit_scale(pair).detach()),
            "zeroshot": {"top1": zs["top1"], "num_samples": zs["num_samples"], "templates": zs["templates"],
                         "how": "mmpt.eval.zeroshot.run_zeroshot (mmpt eval zeroshot)"}}


def mmpt_augment(cfg):
    """The image augmentation mmpt's training stream applies to the source."""
    return dataclasses.asdict(source_augment(cfg, 0).image)


def describe_mmpt(cfg, s: dict) -> dict:
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


if __name__ == "__main__":
    sys.exit(child("mmpt", run_mmpt))
