import re
import subprocess
import sys

import pytest

from mmpt.config import load_config
from mmpt.errors import ConfigError
from mmpt.train.engine import deepspeed_config


def test_shipped_demo_config_loads_with_overrides():
    cfg = load_config("demo", ["model.width=64", "train.steps=7", "deepspeed.zero_stage=3", "optim.lr=3e-4",
                               "model.modalities=[image, text]",
                               "data.sources=[{name: d, shards: d, modalities: [image, text]}]"])
    assert (cfg.model.width, cfg.train.steps, cfg.deepspeed.zero_stage) == (64, 7, 3)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, message", [
    ("model.widht=64", "unknown key 'model.widht'"),
    ("nope.x=1", "unknown key 'nope'"),
    ("model.width=abc", "model.width: expected int"),
    ("train.resume=3", "train.resume=3: must be one of True, False, weights"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage=5"),
    ("model.heads=3", "divisible by model.heads=3"),
    ("model.modalities=[image, smell]", "unknown modality 'smell'"),
    ("data.tasks={image-text: {start_step: -1}}", "data.tasks.image-text.start_step=-1: must be >= 0"),
    ("model.own_trunk=[smell]", "model.own_trunk: 'smell' is not in model.modalities"),
    ("model.own_trunk=[image]", "model.own_trunk: 'image' borrows the video encoder"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("model", "expected dotted.key=value"),
    ("model.video_frames=4", "it is model.video.num_frames now"),
    ("model.video.frames=4", "it is model.video.num_frames now"),
    ("deepspeed.zero_stage=true", "must be one of 0, 1, 2, 3"),
    ("model.moe.router=topk", "model.moe.router='topk': must be one of token_choice, expert_choice"),
    ("optim.betas=[0.9, fast]", "optim.betas[1]: expected float"),
    ("model.heads=0", "model.heads=0: must be positive"),
    ("model.moe.num_experts=-2", "model.moe.num_experts=-2: must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: needs two values in [0, 1)"),
    ("model.dropout=1", "model.dropout=1.0: must be in [0, 1)"),
    ("loss.contrastive_chunk=0", "loss.contrastive_chunk=0: must be positive"),
    ("data.audio.seconds=0.02", "data.audio.seconds=0.02: shorter than one 25 ms fbank window"),
    ("data.audio.max_hz=9000", "data.audio.max_hz=9000.0: must be 0 (the Nyquist frequency of data.audio.sample_rate) "
                               "or in (600, 8000]"),
    ("data.audio.max_hz=500", "data.audio.max_hz=500.0: must be 0"),
    ("model.audio.patch=99", "model.audio.patch=99: larger than data.audio's fbank (32 mel bins x 98 frames)"),
    ("model.width=[1", "override 'model.width': cannot parse value '[1': expected ',' or ']'"),
    # a number in a key indexes a list the config file holds, nothing else
    ("data.sources.7.weight=1", "override 'data.sources.7.weight': data.sources is a list of 5; '7' is not an index"),
    ("data.sources.first.weight=1", "data.sources is a list of 5; 'first' is not an index 0..4"),
    ("data.val.0=x", "override 'data.val.0': data.val='data/demo/val' is a value, not a section or list"),
    ("model.0.width=3", "override 'model.0.width': model is a section, not a list"),
    ("eval.top_k.0=3", "eval.top_k is not in the config file; set the whole list (eval.top_k=[...])"),
    ("data.sources.0.weight=-1", "data.sources[0].weight=-1.0: must be positive"),
    ("data.augment.audio.speed=[1.2, 0.9]", "data.augment.audio.speed=[1.2, 0.9]: needs [min, max] with 0.5 <= min"),
    ("data.augment.video.crop=zoom", "data.augment.video.crop='zoom': must be one of resized, mild, center"),
    ("data.sources.0.augment=3", "data.sources[0].augment=3: expected per-modality changes"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo", [override])


def test_some_task_must_start_at_step_0():
    with pytest.raises(ConfigError, match=re.escape("data.tasks: every task starts late (image-text.start_step=5); "
                                                    "at least one must start at step 0")):
        load_config("photos", ["data.tasks={image-text: {start_step: 5}}"])


def test_indexed_overrides_reach_into_lists():
    cfg = load_config("demo", ["data.sources.0.weight=2", "eval.zeroshot.0.modality=audio",
                               "data.sources.2.modalities.0=image", "optim.betas=[0.8, 0.9]", "optim.betas.1=0.95",
                               "data.sources.1={name: s, shards: x, modalities: [audio, text]}"])
    assert cfg.data.sources[0].weight == 2.0 and cfg.eval.zeroshot[0].modality == "audio"
    assert cfg.data.sources[2].modalities == ["image", "text"] and cfg.optim.betas == [0.8, 0.95]
    assert (cfg.data.sources[1].name, cfg.data.sources[1].weight) == ("s", 1.0)  # a replaced entry: defaults


def test_every_shipped_config_passes_the_checks():
    from mmpt.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        load_config(path.stem)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML: expected ',' or ']', but got '<stream end>' at line 3") as e:
        load_config(str(bad))
    assert "\n" not in str(e.value)  # PyYAML's own message spans lines
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(str(nested))
    with pytest.raises(ConfigError, match="no such file and not a shipped config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_deepspeed_config_follows_run_config():
    cfg = load_config("demo", ["data.batch_size=8", "deepspeed.zero_stage=1",
                               "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}


def test_cli_config_error_is_one_line_and_nonzero():
    proc = subprocess.run([sys.executable, "-m", "mmpt.cli", "train", "--config", "demo", "model.widht=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["mmpt train: error: unknown key 'model.widht' (valid: " + lines[0].split("(valid: ")[1]]
    assert "Traceback" not in proc.stderr


def test_task_terms_name_the_pair_and_field():
    from mmpt.data.stream import tasks_from_config

    with pytest.raises(ConfigError, match=r"data.tasks.text-image: no source feeds this pair .*spelled 'image-text'"):
        load_config("demo", ["data.tasks={text-image: {batch_size: 8}}"])
    # the demo's video-audio terms wait unused when the sources are overridden to image-text only
    cfg = load_config("demo", ["data.sources=[{name: d, shards: d, modalities: [image, text]}]"])
    assert cfg.data.tasks["video-audio"].start_step == 500 and list(tasks_from_config(cfg, expand=False)[0]) == [
        "image-text"]
    with pytest.raises(ConfigError,
                       match=r"data.tasks.video-text.image_size=20: must be divisible by model.patch_size=8"):
        load_config("demo", ["data.tasks={video-text: {image_size: 20}}"])
    with pytest.raises(ConfigError, match=r"data.tasks.image-text.drop_token.video=0.5: needs a modality of the pair"):
        load_config("demo", ["data.tasks={image-text: {drop_token: {video: 0.5}}}"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.tasks.image-text.batch'"):
        load_config("demo", ["data.tasks={image-text: {batch: 8}}"])
    cfg = load_config("demo", ["data.tasks={video-text: {batch_size: 4, image_size: 16, num_frames: 4, "
                               "audio_seconds: 0.5, loss_weight: 0.5}}"])
    tasks, _ = tasks_from_config(cfg, expand=False)
    video, image = tasks["video-text"], tasks["image-text"]
    assert (video.batch_size, video.loss_weight, video.settings.image_size) == (4, 0.5, 16)
    assert video.settings.video.num_frames == 4
    assert (image.batch_size, image.settings.image_size) == (32, 32)  # untouched tasks keep the run's terms


@pytest.mark.parametrize("terms, message", [
    # 8 fbank frames: the audio stem's 16-frame patch kernel would fail at the first audio step
    ("{audio-text: {audio_seconds: 0.1}}",
     "data.tasks.audio-text.audio_seconds=0.1 (as data.audio.seconds): model.audio.patch=16: larger than "
     "data.audio's fbank (32 mel bins x 8 frames)"),
    ("{audio-text: {audio_seconds: 0.02}}", "data.tasks.audio-text.audio_seconds=0.02: shorter than one 25 ms fbank"),
    ("{audio-text: {audio_seconds: 0}}", "data.tasks.audio-text.audio_seconds=0.0: must be positive"),
    ("{video-text: {num_frames: 1}}", "data.tasks.video-text.num_frames=1: fewer than model.video.tubelet=2 frames"),
    ("{video-text: {num_frames: 0}}", "data.tasks.video-text.num_frames=0: must be positive"),
    ("{image-text: {batch_size: 0}}", "data.tasks.image-text.batch_size=0: must be positive"),
    ("{image-text: {image_size: 0}}", "data.tasks.image-text.image_size=0: must be positive"),
    ("{image-text: {loss_weight: 0}}", "data.tasks.image-text.loss_weight=0.0: must be positive"),
    ("{image-text: {drop_token: {image: 1.0}}}", "data.tasks.image-text.drop_token.image=1.0: needs a modality of"),
])
def test_task_terms_get_their_run_wide_twins_checks(terms, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo", [f"data.tasks={terms}"])
