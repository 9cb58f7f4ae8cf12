"""The shipped imp_moe_b16 config, scaled down, trained on CPU on every commit: the same structure (four pairs,
MoE with expert-choice routing in every second layer, DropToken, gradient checkpointing, CoCa decoder) at tiny
widths, each task at its own batch size and resolution, ZeRO-3 with the native MoE on 2 gloo processes."""
import json
import random

import pytest
import torch

from mmpt.config import load_config
from mmpt.data.budget import loader_memory
from mmpt.train.runlog import read_metrics
from tests.conftest import run

TASKS = {"image-text": {"batch_size": 8, "image_size": 32},
         "video-text": {"batch_size": 4, "image_size": 16, "num_frames": 4, "drop_token": {"video": 0.25}},
         "audio-text": {"batch_size": 6, "audio_seconds": 0.5},
         "video-audio": {"batch_size": 4, "image_size": 16, "num_frames": 2, "loss_weight": 0.5}}


def tiny_imp(demo_data, out_dir) -> list:
    sources = [{"name": n, "shards": f"{demo_data}/{part}", "modalities": pair, "weight": 1.0} for n, part, pair in (
        ("image-text", "train", ["image", "text"]), ("audio-text", "speech-train", ["audio", "text"]),
        ("video-text", "motion-train", ["video", "text"]), ("video-audio", "motion-train", ["video", "audio"]))]
    return [f"data.sources={json.dumps(sources)}", f"data.tasks={json.dumps(TASKS)}",
            f"data.val={demo_data}/val", f"data.classes={demo_data}/classes.json",
            "data.batch_size=8", "data.num_workers=1", "data.prefetch=2", "data.shuffle_slots=2",
            "data.shuffle_buffer=16", "data.pin_memory=false",
            "data.video={num_frames: 4, fps: null, window_seconds: null}",
            "data.audio={seconds: 1.0, num_mel_bins: 32}", "data.tokenizer=clip-bpe-8k",
            "model.width=32", "model.depth=4", "model.heads=2", "model.patch_size=8", "model.image_size=32",
            "model.context_length=16", "model.embed_dim=32", "model.decoder_layers=1",
            "model.decoder_cross_layers=1", "model.vocab_size=8514", "model.sot_id=8512", "model.eot_id=8513",
            "model.video={num_frames: 4, tubelet: 2}", "model.audio={fbank_frames: 98, num_mel_bins: 32, patch: 16}",
            "model.moe.num_experts=4", "deepspeed.zero_stage=3", "deepspeed.bf16=false",
            "optim.warmup_steps=2", "train.steps=8", "train.log_every=4", "train.ckpt_every=8",
            f"train.out_dir={out_dir}", "train.peak_tflops=0.05"]


def test_tiny_imp_config_accounts_each_tasks_batch(demo_data, tmp_path):
    cfg = load_config("imp_moe_b16", tiny_imp(demo_data, tmp_path / "run"))
    mem = loader_memory(cfg)["tasks"]
    # uint8 pixels, float16 fbank, int64 tokens; each task at its own batch and size
    assert mem["image-text"]["batch_bytes"] == 8 * (3 * 32 * 32 + 16 * 8)
    assert mem["video-text"]["batch_bytes"] == 4 * (4 * 3 * 16 * 16 + 16 * 8)
    assert mem["audio-text"]["batch_bytes"] == 6 * (48 * 32 * 2 + 16 * 8)
    assert mem["video-audio"]["batch_bytes"] == 4 * (2 * 3 * 16 * 16 + 98 * 32 * 2)
    assert mem["video-text"]["float32_batch_bytes"] == 4 * (4 * 3 * 16 * 16 * 4 + 16 * 8)


@pytest.mark.slow
def test_tiny_imp_moe_trains_all_four_pairs_at_their_own_resolutions_under_zero3(demo_data, tmp_path):
    out = tmp_path / "run"
    env = {"NPROC": "2", "MASTER_PORT": str(random.randint(20000, 40000)), "OMP_NUM_THREADS": "1"}
    proc = run(["launchers/torchrun.sh", "train", "--config", "imp_moe_b16", *tiny_imp(demo_data, out),
                "eval.every=0"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    logged = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in logged] == [4, 8]
    seen = {}
    for m in logged:
        for task in TASKS:
            if f"{task}/steps" in m:
                seen[task] = seen.get(task, 0) + m[f"{task}/steps"]
                assert torch.isfinite(torch.tensor(m[f"{task}/loss"]))  # a running mean over the task's steps
        assert sum(m.get(f"{t}/steps", 0) for t in TASKS) == 4  # every step of the window, whatever its task
        assert m["mfu"] > 0 and m["model_tflops_per_s"] > 0
        assert m["mfu"] == pytest.approx(m["model_tflops_per_s"] / (0.05 * 2))  # train.peak_tflops x 2 ranks
        assert m["mfu_probe"] > 0  # against the matmul probe
    assert sum(seen.values()) == 8 and len(seen) >= 3  # 8 steps drawn over four equal weights
    tokens = {k for m in logged for k in m if k.startswith("tokens_per_s/")}
    assert {"tokens_per_s/text"} <= tokens and len(tokens) >= 3
    samples = sum(TASKS[t]["batch_size"] * n for t, n in seen.items()) * 2
    assert f"done: 8 steps, {samples} samples" in proc.stdout + proc.stderr
