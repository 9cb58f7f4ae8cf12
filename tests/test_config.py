import subprocess
import sys

import pytest

from mmpt.config import ConfigError, load_config
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
    ("data.batch_size=0", "data.batch_size=0"),
    ("model", "expected dotted.key=value"),
    ("model.video_frames=4", "it is model.video.frames now"),
    ("deepspeed.zero_stage=true", "must be one of 0, 1, 2, 3"),
    ("model.moe.router=topk", "model.moe.router='topk': must be one of token_choice, expert_choice"),
    ("optim.betas=[0.9, fast]", "optim.betas[1]: expected float"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("demo", [override])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))
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
