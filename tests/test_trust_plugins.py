"""Loading a model never imports the modules its saved config names in `plugins` without an opt-in
(`--trust-plugins`, `trust_plugins=True`): a run directory, an export or a hub repo (through the local test
double tests/hub_server.py) is a file someone else may have written. Each plugin here is a module in tmp_path
that appends to a marker file beside it when it is imported, under a name no other test uses."""
import io
import json
import sys
import uuid

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import mmpt
from mmpt.config import load_config
from mmpt.errors import UntrustedPluginError
from mmpt.export import CONFIG, export, load_pretrained, native_backend, read_config
from mmpt.hub import from_pretrained
from mmpt.model import build_for_run
from tests.conftest import run
from tests.hub_server import HubServer

TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=16", "model.moe.last=1",
        "model.modalities=[image, text]", "data.sources=[{name: d, shards: d, modalities: [image, text]}]",
        "eval.workers=0"]


def make_plugin(root) -> tuple[str, object]:
    """(module name, marker path): a plugin module under root that appends a line to the marker when imported."""
    name = f"mmpt_marker_{uuid.uuid4().hex[:10]}"
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"{name}.imported"
    (root / f"{name}.py").write_text(f"with open({str(marker)!r}, 'a') as f:\n    f.write('imported\\n')\n")
    return name, marker


def make_run(root, plugins: list[str]):
    """A run directory (config.yaml + model.safetensors of a fresh tiny model) whose config names `plugins`:
    written into the saved file, as a run trained with them (or an edited one) would hold it."""
    cfg = load_config("demo", TINY)
    torch.manual_seed(0)
    model = build_for_run(native_backend(cfg))
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "plugins": plugins}, sort_keys=False))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(root / "model.safetensors"))
    return root


def name_plugins(export_dir, plugins: list[str]):
    """An export whose config.json names `plugins`."""
    data = json.loads((export_dir / CONFIG).read_text())
    (export_dir / CONFIG).write_text(json.dumps({**data, "plugins": plugins}))
    return export_dir


def assert_refused(call, name: str, flag: str) -> None:
    with pytest.raises(UntrustedPluginError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and f"'{name}'" in message and flag in message, message


def test_library_loads_import_nothing_without_trust_plugins(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    first, first_marker = make_plugin(plugins)
    second, second_marker = make_plugin(plugins)
    monkeypatch.syspath_prepend(str(plugins))
    run_dir = make_run(tmp_path / "run", [first])
    exported = name_plugins(export(make_run(tmp_path / "clean", []), tmp_path / "export"), [first])

    for call in (lambda: load_pretrained(run_dir), lambda: from_pretrained(str(run_dir)),
                 lambda: mmpt.from_pretrained(f"local-dir:{exported}"), lambda: load_pretrained(exported),
                 lambda: export(run_dir, tmp_path / "refused")):
        assert_refused(call, first, "trust_plugins=True")
    assert not first_marker.exists() and first not in sys.modules
    assert not (tmp_path / "refused").exists()

    pretrained = mmpt.from_pretrained(f"local-dir:{exported}", trust_plugins=True)
    assert pretrained.cfg.plugins == [first] and first_marker.read_text() == "imported\n"
    # Imported now (as the user's own code would have done): loading it again imports nothing, no opt-in needed.
    assert from_pretrained(str(run_dir)).cfg.plugins == [first]
    assert first_marker.read_text() == "imported\n"

    # export with the opt-in imports the run's plugin and keeps naming it in the export.
    other = make_run(tmp_path / "other", [first, second])
    assert_refused(lambda: export(other, tmp_path / "refused"), second, "--trust-plugins")
    assert not second_marker.exists()
    out = export(other, tmp_path / "other-export", trust_plugins=True)
    assert second_marker.read_text() == "imported\n"
    assert json.loads((out / CONFIG).read_text())["plugins"] == [first, second]


def test_a_config_naming_this_does_not_print_the_zen(tmp_path, capsys):
    if "this" in sys.modules:
        pytest.skip("`this` was imported earlier in this process")
    (tmp_path / CONFIG).write_text(json.dumps({**load_config("demo").to_dict(), "plugins": ["this"]}))
    assert_refused(lambda: read_config(tmp_path), "this", "--trust-plugins")
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    assert "this" not in sys.modules


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mmpt_cli(*args, plugins, **kw):
    return run([sys.executable, "-m", "mmpt.cli", *map(str, args)], env={"PYTHONPATH": str(plugins),
                                                                         "OMP_NUM_THREADS": "1", **kw})


def assert_one_line_refusal(proc, name: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"'{name}'" in lines[0] and "--trust-plugins" in lines[0], lines


def test_cli_eval_and_export_need_trust_plugins(tmp_path):
    plugins = tmp_path / "plugins"
    name, marker = make_plugin(plugins)
    run_dir = make_run(tmp_path / "run", [name])
    for i in range(4):
        (tmp_path / "folder" / ["zero", "one"][i % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / ["zero", "one"][i % 2] / f"{i}.png").write_bytes(png(i))
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": ["zero", "one"]}))
    evaluate = ["eval", "zeroshot", "--model", run_dir, "--data", tmp_path / "folder", "--classes",
                tmp_path / "classes.json", "--device", "cpu"]

    assert_one_line_refusal(mmpt_cli(*evaluate, plugins=plugins), name)
    assert_one_line_refusal(mmpt_cli("export", "--run", run_dir, "--out", tmp_path / "export", plugins=plugins), name)
    assert not marker.exists() and not (tmp_path / "export").exists()

    proc = mmpt_cli(*evaluate, "--trust-plugins", plugins=plugins)
    assert proc.returncode == 0 and json.loads(proc.stdout)["num_samples"] == 4, proc.stderr[-3000:]
    assert marker.read_text() == "imported\n"
    proc = mmpt_cli("export", "--run", run_dir, "--out", tmp_path / "export", "--trust-plugins", plugins=plugins)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "export" / CONFIG).read_text())["plugins"] == [name]
    # The user's own import (`mmpt --plugin`) is the user's choice: nothing more to trust.
    proc = mmpt_cli("--plugin", name, *evaluate, plugins=plugins)
    assert proc.returncode == 0, proc.stderr[-3000:]


HUB_SCRIPT = r"""
import sys
import mmpt
from mmpt.errors import ConfigError

spec, name = sys.argv[1:3]
try:
    mmpt.from_pretrained(spec)
except ConfigError as e:
    print("refused:", type(e).__name__, e)
print("imported before opt-in:", name in sys.modules)
print("loaded plugins:", mmpt.from_pretrained(spec, trust_plugins=True).cfg.plugins)
"""


def test_push_and_hub_download_import_nothing_without_trust_plugins(tmp_path):
    plugins = tmp_path / "plugins"
    name, marker = make_plugin(plugins)
    exported = name_plugins(export(make_run(tmp_path / "run", []), tmp_path / "export"), [name])
    repo = "mmpt-test/plugin-model"
    with HubServer(tmp_path / "hub", tokens=["hf_mmptPluginTest"]) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_mmptPluginTest", "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
        proc = mmpt_cli("push", exported, "--repo", repo, plugins=plugins, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not marker.exists()  # uploading files runs none of them
        proc = run([sys.executable, "-c", HUB_SCRIPT, f"hf-hub:{repo}", name], timeout=300,
                   env={**env, "PYTHONPATH": str(plugins), "OMP_NUM_THREADS": "1"})
    lines = proc.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused:")]
    assert "imported before opt-in: False" in lines, lines
    assert len(refused) == 1 and refused[0].startswith("refused: UntrustedPluginError"), lines
    assert f"'{name}'" in refused[0] and "trust_plugins=True" in refused[0], lines
    assert proc.returncode == 0 and f"loaded plugins: ['{name}']" in lines, proc.stderr[-3000:]
    assert marker.read_text() == "imported\n"
