"""MFU accounting (mmpt.train.throughput): each step's FLOPs from the shapes it ran, checked against torch's
FlopCounterMode on the real model; the datasheet peak and the probe; per-task batch sizes in the run's summary
line and DeepSpeed's batch fields."""
import json
import random
import time

import pytest
import torch
import torch.nn.functional as F

from mmpt.bench.common import count_flops
from mmpt.config import load_config
from mmpt.model import build_model
from mmpt.train import throughput
from mmpt.train.engine import deepspeed_config
from mmpt.train.loop import contrastive_summary
from mmpt.train.runlog import read_metrics
from tests.conftest import run

SOT, EOT = 8512, 8513  # the demo config's clip-bpe-8k ids


def captions(lengths: list, context: int = 16) -> torch.Tensor:
    """SOT, words, EOT, then padding (id 0 is a real token: only the EOT ends a caption)."""
    tokens = torch.randint(0, 8000, (len(lengths), context))
    tokens[:, 0] = SOT
    for row, n in enumerate(lengths):
        tokens[row, n - 1] = EOT
    return tokens


def pixels(*shape) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


MODELS = {  # the demo model (conv stems, images as one-tubelet videos, top-1 MoE) and two variants
    "demo": [],
    "linear-stems": ["model.stem=linear", "model.image_as_video=false"],
    "expert-choice": ["model.moe.router=expert_choice", "model.moe.capacity_factor=1.0", "model.moe.last=0",
                      "model.moe.every=2"],
}
TASKS = [  # (batch, task modalities, DropToken rates): two image resolutions, padded text, video with DropToken
    ({"image": pixels(3, 3, 32, 32), "text": captions([4, 9, 16])}, ["image", "text"], None),
    ({"image": pixels(3, 3, 16, 16), "text": captions([4, 9, 16])}, ["image", "text"], None),
    ({"video": pixels(2, 4, 3, 24, 24), "text": captions([3, 16])}, ["video", "text"], {"video": 0.5}),
    ({"video": pixels(2, 2, 3, 16, 16), "audio": torch.randn(2, 1, 98, 32)}, ["video", "audio"],
     {"video": 0.25, "audio": 0.5}),
    ({"audio": torch.randn(3, 1, 98, 32), "text": captions([2, 5, 7])}, ["audio", "text"], None),
]


def forward_and_projection(model, batch: dict, drop) -> None:
    """The model's forward and the caption loss's vocabulary projection of the decoder's hidden states."""
    out = model(batch, drop_token=drop)
    if "caption_hidden" in out:
        model.decoder.logits(out["caption_hidden"])


@pytest.mark.parametrize("variant", MODELS)
def test_step_flops_are_torch_flop_counts_of_what_each_task_ran(variant):
    cfg = load_config("demo", MODELS[variant]).model
    torch.manual_seed(0)
    model = build_model(cfg).train()  # training: DropToken on
    counter = throughput.StepFlops(cfg)
    for batch, modalities, drop in TASKS:
        ran = count_flops(lambda: forward_and_projection(model, batch, drop))  # noqa: B023
        assert counter.forward(batch, modalities, drop) == ran, (variant, modalities, drop)
        assert counter([batch, batch], modalities, drop) == 3 * 2 * ran  # forward + backward, per micro-batch


def test_text_runs_its_full_length_and_drop_token_shortens_attention():
    cfg = load_config("demo", ["model.moe.num_experts=1", "model.decoder_cross_layers=0"]).model
    counter = throughput.StepFlops(cfg)
    short, full = captions([3, 3]), captions([16, 16])
    # Dense trunk, no decoder: the caption lengths change nothing, the trunk runs all 16 positions.
    assert counter.forward({"text": short}, ["text"]) == counter.forward({"text": full}, ["text"])
    assert counter.run("text", short, None) == (2, 16, 0, 6)
    video = pixels(2, 8, 3, 32, 32)  # 4 tubelets x 4 x 4 patches = 64, DropToken 0.5 keeps 32 of each clip
    assert counter.run("video", video, 0.5) == (2, 32, 128, 64)
    assert counter.run("video", video, 0.0) == (2, 64, 128, 128)


def test_count_flops_counts_attention_on_cpu():
    q = torch.randn(2, 3, 5, 8)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)) == 4 * 2 * 3 * 5 * 5 * 8


def test_datasheet_peaks_and_the_override():
    bf16, fp32, datasheet_peak = torch.bfloat16, torch.float32, throughput.datasheet_peak
    assert datasheet_peak("NVIDIA H100 80GB HBM3", bf16) == 989.5e12
    assert datasheet_peak("NVIDIA H100 PCIe", bf16) == 756.5e12
    assert datasheet_peak("NVIDIA H100 NVL", bf16) == 835.5e12
    assert datasheet_peak("NVIDIA H200", torch.float16) == 989.5e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", bf16) == 312e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", fp32) == 19.5e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", fp32, fp32_precision="high") == 156e12  # TF32 matmuls
    assert datasheet_peak("NVIDIA L4", bf16) == 121e12 and datasheet_peak("NVIDIA L40S", bf16) == 362.05e12
    assert datasheet_peak("NVIDIA A10G", bf16) == 70e12 and datasheet_peak("NVIDIA A10", bf16) == 125e12
    assert datasheet_peak("Tesla V100-SXM2-16GB", torch.float16) == 125e12
    assert datasheet_peak("Tesla V100-SXM2-16GB", bf16) is None  # no bf16 tensor cores
    assert datasheet_peak("AMD Instinct MI250X", bf16) == 191.5e12  # one GCD: half the card
    assert datasheet_peak("AMD Instinct MI300X", bf16) == 1307.4e12
    assert datasheet_peak("Some Future GPU", bf16) is None
    cpu = torch.device("cpu")
    peak, why = throughput.peak_flops(load_config("demo"), cpu, fp32)
    assert peak is None and "train.peak_tflops" in why
    assert throughput.peak_flops(load_config("demo", ["train.peak_tflops=0.5"]), cpu, fp32)[0] == 0.5e12


def test_mfu_against_the_peak_and_the_probe():
    sums = {("image-text", "tokens/image"): torch.tensor(40.0), ("image-text", "tokens/text"): torch.tensor(60.0)}
    out = throughput.window_throughput(sums, 2.0, 2, 8e12, peak=10e12, probe=4e12)
    assert out["model_tflops_per_s"] == 4.0 and out["mfu"] == 0.2 and out["mfu_probe"] == 0.5
    assert out["tokens_per_s/image"] == 40.0 and out["tokens_per_s/text"] == 60.0
    assert "mfu" not in throughput.window_throughput(sums, 2.0, 2, 8e12, peak=None, probe=4e12)  # no peak known


def test_the_first_window_starts_after_the_probe_and_the_accounting():
    said = []
    before = time.time()
    window = throughput.open_window(load_config("demo"), 1, torch.device("cpu"), torch.float32, say=said.append)
    assert window["t"] - before >= 0.5  # the probe alone measures for 0.5 s
    assert window["peak"] is None and window["probe"] > 0 and window["flops"] == 0.0
    assert "no datasheet peak for cpu" in said[0] and "mfu_probe" in said[0]


def test_the_summary_line_gives_each_tasks_negatives_per_positive():
    cfg = load_config("imp_moe_b16")  # image-text, audio-text 256 a rank; video-text, video-audio 128
    line = contrastive_summary(cfg, 8)
    assert "image-text, audio-text: 256 rows a rank, 2047 negatives per positive" in line
    assert "video-text, video-audio: 128 rows a rank, 1023 negatives per positive" in line
    grouped = contrastive_summary(load_config("imp_moe_b16", ["loss.contrastive_group_size=2"]), 8)
    assert "511 negatives per positive" in grouped and "the global batch would give 2047 for" in grouped
    tasks = {"image-text": {"batch_size": 48}, "video-text": {"batch_size": 8}}
    cfg = load_config("imp_moe_b16", ["data.batch_size=16", "train.accumulate=2", f"data.tasks={json.dumps(tasks)}"])
    line = contrastive_summary(cfg, 4)
    assert "image-text: 96 rows a rank, 383 negatives" in line and "video-text: 16 rows a rank, 63 negatives" in line
    assert "audio-text, video-audio: 32 rows a rank, 127 negatives" in line  # data.batch_size x 2 micro-batches


def test_deepspeed_batch_fields_take_the_largest_tasks_batch():
    tasks = {"image-text": {"batch_size": 48}, "video-text": {"batch_size": 8}}
    cfg = load_config("imp_moe_b16", ["data.batch_size=16", "train.accumulate=2", f"data.tasks={json.dumps(tasks)}"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 48 and ds["train_batch_size"] == 48 * 2 * 4
    small = {pair: {"batch_size": 8} for pair in ("image-text", "video-text", "audio-text", "video-audio")}
    ds = deepspeed_config(load_config("imp_moe_b16", [f"data.tasks={json.dumps(small)}"]), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 16  # not data.batch_size=256


@pytest.mark.slow
def test_logged_model_flops_are_what_the_steps_ran(demo_data, tmp_path):
    """One process, image-text at 16 px (the model's 32) with DropToken: the logged FLOPs are 3 x the torch
    count of the forward at those shapes, text at its full length; no datasheet peak on a CPU, so no mfu."""
    tasks = {"image-text": {"batch_size": 8, "image_size": 16, "drop_token": {"image": 0.5}}}
    over = [f"data.sources=[{{name: digits, shards: {demo_data}/train, modalities: [image, text]}}]",
            f"data.val={demo_data}/val", f"data.classes={demo_data}/classes.json",
            f"data.tasks={json.dumps(tasks)}", "data.batch_size=4", "model.moe.num_experts=1",
            "model.decoder_cross_layers=0", "model.width=32", "model.heads=2", "model.embed_dim=32",
            "train.steps=2", "train.log_every=2", f"train.out_dir={tmp_path}", "eval.every=0"]
    env = {"NPROC": "1", "MASTER_PORT": str(random.randint(20000, 40000)), "OMP_NUM_THREADS": "1"}
    proc = run(["launchers/torchrun.sh", "train", "--config", "demo", *over], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    m = [r for r in read_metrics(tmp_path) if "loss" in r][-1]
    seconds = 2 * 8 / m["samples_per_s"]
    cfg = load_config("demo", over).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    forward = count_flops(lambda: model({"image": pixels(8, 3, 16, 16), "text": captions([5] * 8)},
                                        drop_token={"image": 0.5}))
    assert m["model_tflops_per_s"] * 1e12 * seconds == pytest.approx(3 * 2 * forward, rel=1e-9)
    assert "mfu" not in m and m["mfu_probe"] > 0
    assert "mfu: no datasheet peak for cpu" in proc.stdout + proc.stderr
