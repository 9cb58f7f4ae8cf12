"""The modality registry: a fifth modality defined in this file alone (a 1-D "sensor" signal stored as .npy, with
config sections of its own: data.sensor, model.sensor) builds shards, checks them, trains on 2 torchrun processes
paired with text with its settings read from a YAML file, and is evaluated zero-shot with its default prompts,
with no change to the package. Also: the one pair spelling, registration errors, and
the reader for checkpoints and run configs from before the registry.

This module is also the plugin the subprocesses import (`--plugin tests.test_modality`, `plugins=[...]`)."""
import io
import json
import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml

from mmpt import modality
from mmpt.data.samples import BadSample
from mmpt.model.stems import PatchStem
from tests.conftest import run

LENGTH, PATCH = 64, 8  # samples per signal fed to the stem, samples per token (the sections' defaults)


@dataclass
class SensorConfig:
    """data.sensor: how a signal is decoded."""
    length: int = LENGTH  # samples per signal fed to the stem
    gain: float = 1.0  # the signal is multiplied by it


@dataclass
class SensorStemConfig:
    """model.sensor: the stem's layout."""
    length: int = LENGTH  # samples its position embedding is laid out for
    patch: int = PATCH  # samples per token


def decode_sensor(data: bytes, settings, train: bool, rng: random.Random) -> torch.Tensor:
    """(1, data.sensor.length) float signal: a random (train) or centred crop, zero-padded when short."""
    length, x = settings.sensor.length, torch.from_numpy(load_signal(data)) * settings.sensor.gain
    start = rng.randint(0, max(0, x.numel() - length)) if train else max(0, x.numel() - length) // 2
    x = x[start:start + length]
    return torch.nn.functional.pad(x, (0, length - x.numel()))[None]


def sensor_rules(cfg) -> list:
    d, m = cfg.data.sensor, cfg.model.sensor
    return [("data.sensor.length", d.length, d.length % m.patch == 0,
             f"must be a multiple of model.sensor.patch={m.patch}")]


def load_signal(data: bytes) -> np.ndarray:
    if not data:
        raise BadSample("zero_length", "empty signal")
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadSample("undecodable", f"npy: {e}") from None
    if x.ndim != 1 or x.size == 0:
        raise BadSample("undecodable", f"expected a non-empty 1-D signal, got shape {x.shape}")
    return x.astype(np.float32)


def probe_sensor(data: bytes) -> dict:
    x = load_signal(data)
    return {"length": x.size, "std": float(x.std())}


SENSOR = modality.register(modality.Modality(
    "sensor", ("npy",), decode_sensor, probe_sensor,
    stem=lambda c: PatchStem(c.width, 1, (1, 1, c.sensor.patch), (1, 1, c.sensor.length // c.sensor.patch),
                             c.drop_token.get("sensor", 0.0)),
    tokens=lambda c: c.sensor.length // c.sensor.patch, inputs_per_token=lambda c: c.sensor.patch,
    stem_input=lambda x, repeat: x[:, :, None, None, :],  # (B, 1, L) -> (B, 1, T=1, H=1, W=L)
    templates=("a sensor recording of {}.", "a signal of {}."),
    data_config=SensorConfig, model_config=SensorStemConfig, rules=sensor_rules,
    positive=("data.sensor.length", "model.sensor.length", "model.sensor.patch")), replace=True)

WORDS = ["slow", "medium", "fast"]


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32))
    return buf.getvalue()


def write_sensor_manifest(root, n: int = 48) -> None:
    """Sine waves at three frequencies, each class captioned by its word; one broken file to be refused."""
    root.mkdir()
    rows, rng = [], np.random.default_rng(0)
    for i in range(n):
        label = i % 3
        t = np.arange(LENGTH + 16)
        signal = np.sin(2 * np.pi * (label + 1) * t / 32 + rng.uniform(0, 6.28)) + 0.05 * rng.normal(size=t.size)
        (root / f"s{i}.npy").write_bytes(npy_bytes(signal))
        rows.append({"sensor": f"s{i}.npy", "text": f"a {WORDS[label]} signal", "label": label})
    (root / "broken.npy").write_bytes(b"not a numpy file")
    rows.append({"sensor": "broken.npy", "text": "a broken signal"})
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def mmpt(*args, **kw):
    return run([sys.executable, "-m", "mmpt.cli", "--plugin", "tests.test_modality", *map(str, args)], **kw)


@pytest.mark.slow
def test_fifth_modality_builds_checks_trains_and_evaluates(tmp_path):
    write_sensor_manifest(tmp_path / "src")
    proc = mmpt("shards", "build", "--manifest", tmp_path / "src" / "m.jsonl", "--out", tmp_path / "shards",
                "--prefix", "sensor", "--shard-size", "12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["written"] == 48 and summary["refused"] == {"unreadable": 1}
    assert summary["keys"] == {"npy": 48, "txt": 48, "json": 48}

    proc = mmpt("shards", "check", tmp_path / "shards", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["bad"] == 0 and report["samples_per_modality"] == {"sensor": 48, "text": 48}
    assert report["stats"]["sensor_length"]["min"] == LENGTH + 16

    out = tmp_path / "run"
    yaml_file = sensor_yaml(tmp_path, tmp_path / "shards", length=32)
    proc = run(["launchers/torchrun.sh", "train", "--config", yaml_file, "eval.zeroshot=[]", "eval.retrieval=[]",
                "model.width=32",
                "model.depth=2", "model.heads=2", "model.embed_dim=16", "model.moe.num_experts=2", "data.batch_size=8",
                "train.steps=2", "train.log_every=1", f"train.out_dir={out}"],
               env={"NPROC": "2", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and {m["task"] for m in metrics} == {"sensor-text"}
    assert all(np.isfinite(m["contrastive_loss/sensor-text"]) and m["caption_loss"] > 0 for m in metrics)
    assert "moe/sensor/dropped_rate" in metrics[0]
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the plugin's sections travel with the run
    assert saved["data"]["sensor"] == {"length": 32, "gain": 0.5} and saved["model"]["sensor"]["length"] == 32

    (tmp_path / "classes.json").write_text(json.dumps({"classnames": WORDS}))  # prompts: the registry's
    proc = run([sys.executable, "-m", "mmpt.cli", "eval", "zeroshot", "--run", out, "--modality", "sensor",
                "--data", tmp_path / "shards", "--classes", tmp_path / "classes.json", "--out", tmp_path / "zs.json",
                "--trust-plugins"])  # the run's config names tests.test_modality; loading it imports it on opt-in
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "zs.json").read_text())
    assert result["num_samples"] == 48 and result["num_classes"] == 3 and result["templates"] == 2
    assert result["top5"] == 1.0  # k clipped to the 3 classes


def sensor_yaml(tmp_path, shards, length: int) -> str:
    """A run config naming the plugin, with the plugin's own sections set in the file."""
    path = tmp_path / "sensor.yaml"
    path.write_text(f"""plugins: [tests.test_modality]
data:
  sources: [{{name: waves, shards: {shards}, modalities: [sensor, text]}}]
  sensor: {{length: {length}, gain: 0.5}}
model:
  modalities: [sensor, text]
  sensor: {{length: {length}, patch: 8}}
""")
    return str(path)


def test_fifth_modality_settings_come_from_yaml(tmp_path):
    """data.sensor and model.sensor are config keys like any built-in: read from YAML, typed, checked, used."""
    from mmpt.config import load_config
    from mmpt.data.media import DecodeSettings
    from mmpt.errors import ConfigError
    from mmpt.model.info import model_info

    cfg = load_config(sensor_yaml(tmp_path, "s", length=32))
    assert (cfg.data.sensor.length, cfg.data.sensor.gain, cfg.model.sensor.length) == (32, 0.5, 32)
    ones = npy_bytes(np.ones(100))
    x = decode_sensor(ones, DecodeSettings.from_config(cfg), False, random.Random(0))
    assert x.shape == (1, 32) and torch.allclose(x, torch.full((1, 32), 0.5))
    assert model_info(cfg)["tokens_per_sample"]["sensor"] == 32 // PATCH
    with pytest.raises(ConfigError, match=r"data.sensor.length=30: must be a multiple of model.sensor.patch=8"):
        load_config(sensor_yaml(tmp_path, "s", length=30))
    with pytest.raises(ConfigError, match=r"data.sensor.gain: expected float, got str 'loud'"):
        load_config(sensor_yaml(tmp_path, "s", length=32), ["data.sensor.gain=loud"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.sensor.size'"):
        load_config(sensor_yaml(tmp_path, "s", length=32), ["model.sensor.size=3"])


def test_a_registered_modality_the_run_does_not_use_stays_out_of_its_saved_config():
    """With the sensor plugin imported here, a demo run's config.yaml / export must still load where it is not."""
    from mmpt.config import load_config

    saved = load_config("demo").to_dict()
    assert "sensor" not in saved["data"] and "sensor" not in saved["model"] and "sensor" not in saved["data"]["augment"]
    assert {"video", "audio"} <= set(saved["data"]) and "image" in saved["data"]["augment"]  # the run's own stay


def test_model_info_counts_the_fifth_modality():
    from mmpt.config import load_config
    from mmpt.model.info import model_info

    cfg = load_config("demo", ["model.modalities=[sensor, text]", "plugins=[tests.test_modality]", "eval.zeroshot=[]",
                               "eval.retrieval=[]",
                               "data.sources=[{name: s, shards: s, modalities: [text, sensor]}]"])
    info = model_info(cfg)
    assert info["tokens_per_sample"] == {"sensor": LENGTH // PATCH, "text": 16}
    assert info["gflops_per_sample"]["sensor"] > 0


def test_one_spelling_of_a_pair():
    assert modality.pair_name("text", "video") == modality.pair_name("video", "text") == "video-text"
    assert modality.pair_name("audio", "video") == "video-audio"
    assert modality.pair_name("text", "sensor") == "sensor-text"  # extensions go before text
    assert list(modality.MODALITIES)[-1] == modality.TEXT
    # Extensions are ordered by name, not by import order, and redefining one keeps its place.
    order = list(modality.MODALITIES)
    modality.register(SENSOR, replace=True)
    assert list(modality.MODALITIES) == order == ["image", "video", "audio", "sensor", "text"]
    assert modality.pairs(["text", "image", "audio"]) == [("image", "audio"), ("image", "text"), ("audio", "text")]


HOOKS = (decode_sensor, probe_sensor, SENSOR.stem, SENSOR.tokens)


def test_registration_errors_name_the_problem():
    with pytest.raises(ValueError, match="registered already"):
        modality.register(SENSOR)
    with pytest.raises(ValueError, match="lower-case letters and digits"):
        modality.register(modality.Modality("my_imu", ("imu",), *HOOKS))
    with pytest.raises(ValueError, match=r"\['wav'\] belong to \['audio'\]"):
        modality.register(modality.Modality("imu", ("wav",), *HOOKS))


def test_unknown_modality_and_plugin_errors_name_the_key():
    from mmpt.config import load_config
    from mmpt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown modality 'thermal'.*more come from plugins"):
        load_config("demo", ["model.modalities=[thermal, text]"])
    with pytest.raises(ConfigError, match="plugins: cannot import 'no.such.module'"):
        load_config("demo", ["plugins=[no.such.module]"])


def test_checkpoints_and_configs_from_before_the_registry_load():
    """Old runs named pair parameters `image_text` and kept model.video_frames etc. at the top of model."""
    from mmpt.config import config_from_dict, load_config
    from mmpt.model import build_for_run

    cfg = load_config("demo")
    old = cfg.to_dict()
    old["model"].update(video_frames=4, tubelet=2, audio_frames=50, audio_mel=64, audio_patch=16)
    del old["model"]["video"], old["model"]["audio"]
    upgraded = config_from_dict(old)
    assert (upgraded.model.video.num_frames, upgraded.model.audio.num_mel_bins) == (4, 64)

    model = build_for_run(upgraded)
    state = {k.replace("video-text", "text_video").replace("image-text", "image_text"): v
             for k, v in model.state_dict().items()}
    assert "log_scales.text_video" in state
    state["log_scales.text_video"] = torch.full((1,), 1.5)
    fresh = build_for_run(upgraded)
    fresh.load_state_dict(state)  # strict: every old key found its new name
    assert fresh.log_scales["video-text"].item() == 1.5
