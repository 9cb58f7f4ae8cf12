"""GradCache accumulation against one pass over the same contrastive batch, on the demo encoder (one process).

    mmpt bench accumulate --json

Image-text InfoNCE over B = 256 pairs through the demo model's stems, shared trunk and heads: one pass over
all B, then k = 2, 4, 8 micro-batches with `accumulated_contrastive_backward`. Per setting: forward +
backward time (median of 3), peak memory of the step (`PeakMemory`: activations, logits, gradients;
parameters excluded), and the largest gradient difference from the one pass. Shows what accumulation buys
(peak memory falling with k) and costs (one extra forward of every micro-batch).
"""
from __future__ import annotations

import torch

from mmpt.bench.common import median_ms, peak_mb
from mmpt.config import load_config
from mmpt.losses import contrastive_loss
from mmpt.losses.accumulate import accumulated_contrastive_backward
from mmpt.model import build_for_run


def _measure(model, step, repeats: int = 3) -> tuple[dict, list]:
    def clear():
        model.zero_grad(set_to_none=True)

    ms = median_ms(step, repeats, before=clear)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    clear()
    return {"ms": ms, "peak_mb": peak_mb(step)}, grads


def run(batch: int = 256, micro=(2, 4, 8)) -> dict:
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.modalities=[image, text]", "model.dropout=0.0",
                               "data.sources=[{name: d, shards: d, modalities: [image, text]}]"])
    model = build_for_run(cfg)
    images = torch.randn(batch, 3, cfg.model.image_size, cfg.model.image_size)
    text = torch.randint(1, 1000, (batch, cfg.model.context_length))
    text[:, -1] = cfg.model.eot_id

    def encode(modality, x):
        return model.encode(modality, x)["emb"]

    def one_pass():
        out = model({"image": images, "text": text}, caption=False)
        contrastive_loss(out["emb"]["image"], out["emb"]["text"], out["logit_scale"]["image-text"])[0].backward()

    full, reference = _measure(model, one_pass)
    result = {"bench": "accumulate", "batch": batch, "model": "demo (image-text)", "one_pass": full}
    for k in micro:
        chunks = list(zip(images.chunk(k), text.chunk(k), strict=True))

        def accumulated():
            accumulated_contrastive_backward(lambda mb: encode("image", mb[0]), lambda mb: encode("text", mb[1]),
                                             chunks, model.logit_scale("image-text"))  # noqa: B023 (called now)

        stats, grads = _measure(model, accumulated)
        stats["max_grad_diff"] = max(float((g - r).abs().max()) for g, r in zip(grads, reference, strict=True))
        stats["peak_mb_ratio"] = stats["peak_mb"] / full["peak_mb"]
        stats["ms_ratio"] = stats["ms"] / full["ms"]
        result[f"k{k}"] = stats
    return result


def add_arguments(parser) -> None:
    """No flags: the batch and the micro-batch counts are the bench's definition."""


def main(args) -> dict:
    return run()
