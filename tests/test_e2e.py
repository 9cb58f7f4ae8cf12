"""End to end through the real stack: torchrun (2 gloo processes) -> DeepSpeed -> evals during training ->
checkpoint -> resume -> zero-shot eval -> export -> plot. Small model, the real demo shards."""
import json
import random
import sys

import pytest
import torch

from mmpt.export import load_pretrained
from mmpt.hub import from_pretrained
from mmpt.train.checkpoint import latest_tag
from mmpt.train.consolidate import consolidated_state_dict
from mmpt.train.runlog import read_metrics
from tests.conftest import run

TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=32", "data.batch_size=16",
        "train.log_every=2", "train.ckpt_every=4", "optim.warmup_steps=2", "optim.lr=0.005"]


def train(demo_data, out_dir, steps, *extra):
    sources = ", ".join(f"{{name: {name}, shards: {demo_data}/{part}, modalities: [{pair}]}}" for name, part, pair in (
        ("digits", "train", "image, text"), ("speech", "speech-train", "audio, text"),
        ("motion", "motion-train", "video, text"), ("sound", "motion-train", "video, audio")))
    data = [f"data.sources=[{sources}]", f"data.val={demo_data}/val", f"data.classes={demo_data}/classes.json"]
    env = {"NPROC": "2", "MASTER_PORT": str(random.randint(20000, 40000)), "OMP_NUM_THREADS": "1"}
    proc = run(["launchers/torchrun.sh", "train", "--config", "demo", *TINY, *data, f"train.out_dir={out_dir}",
                f"train.steps={steps}", "eval.every=0", *extra], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_train_checkpoint_resume_eval_export(demo_data, tmp_path):
    out = tmp_path / "run"
    train(demo_data, out, 8, "eval.every=4")  # the demo config's evals: image zero-shot and image-text retrieval
    ckpt = out / "checkpoints"
    assert latest_tag(ckpt) == "step0000008"
    first = read_metrics(out)
    assert [m["step"] for m in first if "loss" in m] == [2, 4, 6, 8]
    top1 = "eval/zeroshot/image/val/top1"
    evals = [m for m in first if top1 in m]
    assert [m["step"] for m in evals] == [4, 8]
    assert all(0 <= m["eval/retrieval/image-text/val/image_to_text/R@1"] <= 1 for m in evals)
    best = json.loads((out / "best.json").read_text())  # the best image top-1 keeps checkpoints/best
    assert best["value"] == max(m[top1] for m in evals) and (ckpt / "best").is_dir()
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())

    proc = train(demo_data, out, 14, "eval.every=4")  # resumes from step 8
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6, 8, 10, 12, 14]
    assert [m["step"] for m in metrics if top1 in m] == [4, 8, 12, 14]
    assert "done: 14 steps" in proc.stdout + proc.stderr
    assert latest_tag(ckpt) == "step0000014"  # the best checkpoint never becomes `latest`
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step0000012", "step0000014"]  # keep_checkpoints=2
    assert (ckpt / "best").is_dir()
    metrics = [m for m in metrics if "loss" in m]
    proc = run([sys.executable, "-m", "mmpt.cli", "plot", str(out)])
    assert proc.returncode == 0 and (out / "plots" / "eval.png").is_file(), proc.stderr[-2000:]
    # Tasks alternate, so compare like with like: the caption loss (every task with text has one).
    caption = [(m["step"], m["caption_loss"]) for m in metrics if "caption_loss" in m]
    assert caption[-1][1] < caption[0][1] - 0.5, caption
    # Resumed weights, not a fresh start: after resuming the caption loss stays well below its start.
    resumed = [loss for step, loss in caption if step > 8]
    assert resumed and resumed[0] < caption[0][1] - 0.3, caption
    assert all(m["skipped"] == 0 for m in metrics)
    tasks = {m["task"] for m in metrics}
    assert len(tasks) >= 2 and tasks <= {"image-text", "audio-text", "video-text", "video-audio"}, tasks
    assert any(k.startswith("moe/") and k.endswith("/dropped_rate") for m in metrics for k in m)
    # The demo config centres embeddings (loss.centre_embeddings): the running centres of every trained
    # modality reach the consolidated weights that evaluation and export load.
    state = consolidated_state_dict(ckpt)
    assert all(state[f"centres.{m}"].any() for m in ("image", "text")), sorted(k for k in state if "centres" in k)

    result_path = tmp_path / "zeroshot.json"
    proc = run([sys.executable, "-m", "mmpt.cli", "eval", "zeroshot", "--run", str(out), "--out", str(result_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["num_samples"] == 297 and result["num_classes"] == 10
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0

    export_dir = tmp_path / "export"
    proc = run([sys.executable, "-m", "mmpt.cli", "export", "--run", str(out), "--out", str(export_dir),
                "--results", str(result_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessing.json", "README.md"} <= {
        p.name for p in export_dir.iterdir()}
    from huggingface_hub import ModelCard

    card = ModelCard.load(export_dir / "README.md")
    assert card.data.library_name == "mmpt" and "mixture-of-experts" in card.data.tags
    top1 = {(r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert top1[("zero-shot-image-classification", "top1")] == result["top1"]
    # The DeepSpeed ZeRO-2 checkpoint, consolidated, and the export give the same embeddings for every modality.
    from_run, cfg = load_pretrained(out)
    pretrained = from_pretrained(str(export_dir))
    torch.manual_seed(0)
    inputs = {"image": torch.randn(2, 3, 32, 32), "video": torch.randn(2, 8, 3, 32, 32),
              "audio": torch.randn(2, 1, 98, 128), "text": pretrained.tokenizer(["a seven", "the number 3"])}
    assert sorted(inputs) == sorted(cfg.model.modalities)
    with torch.no_grad():
        for m, x in inputs.items():
            torch.testing.assert_close(from_run.encode(m, x)["emb"], pretrained.model.encode(m, x)["emb"])


@pytest.mark.slow
@pytest.mark.parametrize("stage, backend, accumulate", [(3, "native", 2), (2, "deepspeed", 1)])
def test_moe_backends_train_under_zero(demo_data, tmp_path, stage, backend, accumulate):
    """ZeRO-3 with the native MoE (batched expert weights) and accumulated (GradCache) steps; ZeRO-2 with DeepSpeed's
    expert-parallel MoE (ep_size=2)."""
    out = tmp_path / f"z{stage}"
    evals = "eval.every=4" if backend == "native" else "eval.every=0"  # ZeRO-3 evals gather the partitions
    proc = train(demo_data, out, 4, f"deepspeed.zero_stage={stage}", f"model.moe.backend={backend}",
                 "model.moe.ep_size=2", f"train.accumulate={accumulate}", evals)
    assert f"done: 4 steps, {4 * accumulate * 16 * 2} samples" in proc.stdout + proc.stderr
    metrics = read_metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4] and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    if backend == "native":
        assert [m["step"] for m in metrics if "eval/zeroshot/image/val/top1" in m] == [4]
        model, cfg = load_pretrained(out)
        assert cfg.deepspeed.zero_stage == 3
        from mmpt.model.info import model_info

        # full, not a rank's partition
        assert sum(p.numel() for p in model.parameters()) == model_info(cfg)["parameters"]


def test_missing_shards_fail_before_training(tmp_path):
    spec = f"{tmp_path}/nothing-*.tar"
    proc = run([sys.executable, "-m", "mmpt.cli", "train", "--config", "demo",
                f"data.sources=[{{name: x, shards: '{spec}', modalities: [image, text]}}]",
                f"train.out_dir={tmp_path}/run"], env={"WORLD_SIZE": "1", "RANK": "0"})
    assert proc.returncode == 2
    assert f"shards '{tmp_path}/nothing-*.tar' matches no shards" in proc.stderr
    assert "Traceback" not in proc.stderr
