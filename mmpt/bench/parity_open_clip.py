"""The open_clip side of `mmpt bench parity`: open_clip's own trainer (`open_clip_train.main`) as shipped, its
loss wrapped to record each step, then zero-shot with open_clip's classifier. Run as
`python -m mmpt.bench.parity_open_clip SETTINGS` by the driver, in a process of its own."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import open_clip
import open_clip_train.data as oc_data
import open_clip_train.main as oc_main
import torch
import webdataset as wds

from mmpt.bench.common import count_flops
from mmpt.bench.parity_common import (
    MODEL_NAME,
    StepRecorder,
    child,
    loss_summary,
    open_clip_argv,
    param_counts,
    sample_batch,
    set_threads,
)
from mmpt.bench.step import open_clip_config


def run_open_clip(s: dict) -> dict:
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


if __name__ == "__main__":
    sys.exit(child("open_clip", run_open_clip))
