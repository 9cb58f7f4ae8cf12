"""Export, model card, from_pretrained and push, against a local hub test double (tests/hub_server.py).

The run directories here hold config.yaml + model.safetensors of a freshly initialised four-modality MoE model
(load_pretrained reads them like an older export), so no training is needed; tests/test_e2e.py exports a real
torchrun + DeepSpeed run. Everything that talks to the hub runs in a subprocess whose HF_ENDPOINT is the local
server, with proxies pointing nowhere so that no request can leave the machine."""
import io
import json
import random
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmpt import modality as registry
from mmpt.config import load_config
from mmpt.data.media import DecodeSettings
from mmpt.errors import DataError
from mmpt.export import card_metadata, export, load_pretrained, native_backend
from mmpt.hub import OpenClipModel, from_pretrained, push
from mmpt.model import build_for_run
from tests.conftest import run
from tests.hub_server import HubServer
from tests.media_files import make_audio, make_video

TINY = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=32", "model.moe.last=1"]
EXPORT_FILES = {"model.safetensors", "config.json", "tokenizer.json", "preprocessing.json", "README.md"}
FAKE_TOKEN = "hf_mmptFakeToken7Q2xK9"  # distinctive: grepped for in every captured output
BAD_TOKEN = "hf_mmptWrongToken4Zr8W"


def make_run(root, *overrides):
    """A run directory with the resolved config and the weights of a freshly initialised model."""
    cfg = load_config("demo", [*TINY, *overrides])
    torch.manual_seed(0)
    model = build_for_run(native_backend(cfg))
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(root / "model.safetensors"))
    return root


RESULTS = {
    "zeroshot": {"top1": 0.8, "top5": 0.97, "per_class_accuracy": {"zero": 1.0, "one": 0.6},
                 "confusion": [[1, 0], [2, 3]], "num_samples": 297, "num_classes": 10, "chance_top1": 0.1,
                 "skipped": 0, "data": "data/demo/val", "modality": "image", "templates": 4},
    "retrieval": {"pair": "image-text", "num_samples": 297, "skipped": 0, "data": "data/demo/val",
                  "image_to_text": {"R@1": 0.5, "R@5": 0.9, "R@10": 0.95, "median_rank": 1.0},
                  "text_to_image": {"R@1": 0.4, "R@5": 0.8, "R@10": 0.9, "median_rank": 2.0}},
    "caption": {"bleu4": 0.31, "cider": 1.2, "num_samples": 297, "modality": "image", "num_beams": 1, "max_len": 16,
                "examples": [{"key": "a", "hypothesis": "x", "reference": "y"}], "data": "data/demo/val",
                "skipped": 0},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    run_dir = make_run(root / "run")
    paths = []
    for name, result in RESULTS.items():
        paths.append(root / f"{name}.json")
        paths[-1].write_text(json.dumps(result))
    return run_dir, export(run_dir, root / "export", paths)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """One real file per modality of the model (the registry's decoders read them)."""
    root = tmp_path_factory.mktemp("media")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    files = {"image": buf.getvalue(), "video": make_video(root / "v.mp4", seconds=1.0),
             "audio": make_audio(root / "a.wav", seconds=1.5), "text": b"the number seven written by hand"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


def reference_embeddings(run_dir, media) -> dict:
    """Each modality decoded from the run config (eval mode) and encoded by the run's model."""
    model, cfg = load_pretrained(run_dir)
    spec = DecodeSettings.from_config(cfg)
    with torch.no_grad():
        return {m: model.encode(m, registry.get(m).decode(path.read_bytes(), spec, False, random.Random(0))[None])
                ["emb"] for m, path in media.items()}


def test_export_writes_weights_config_tokenizer_preprocessing(exported):
    run_dir, out = exported
    assert EXPORT_FILES <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text()) == yaml.safe_load((run_dir / "config.yaml").read_text())
    assert json.loads((out / "tokenizer.json").read_text()) == {
        "kind": "huggingface", "path": "tokenizer", "context_length": 16, "sot_id": 8512, "eot_id": 8513,
        "vocab_size": 8514}  # the demo's clip-bpe-8k, copied into the export
    prep = json.loads((out / "preprocessing.json").read_text())
    assert list(prep["modalities"]) == ["image", "video", "audio", "text"]
    assert prep["modalities"]["video"]["settings"]["video"]["num_frames"] == 8
    assert prep["modalities"]["audio"]["settings"]["audio"]["seconds"] == 1.0 and prep["pixel_std"][0] == 0.26862954
    image = prep["modalities"]["image"]["settings"]
    assert "video" not in image and image["image_size"] == 32 and image["tokenizer"] == "tokenizer"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(run_dir / "model.safetensors")).keys()


def test_from_pretrained_gives_the_runs_embeddings_for_every_modality(exported, media):
    run_dir, out = exported
    expected = reference_embeddings(run_dir, media)
    for spec in (str(out), f"local-dir:{out}", str(run_dir)):
        pretrained = from_pretrained(spec)
        assert pretrained.cfg.model.modalities == ["image", "video", "audio", "text"]
        with torch.no_grad():
            for m, path in media.items():
                emb = pretrained.model.encode(m, pretrained.preprocess[m](path.read_bytes())[None])["emb"]
                assert torch.equal(emb, expected[m]), (spec, m)
            text = pretrained.model.encode("text", pretrained.tokenizer(media["text"].read_text()))["emb"]
        assert torch.equal(text, expected["text"])


def test_model_card_parses_with_huggingface_hub(exported):
    from huggingface_hub import ModelCard

    from mmpt.model.info import model_info

    run_dir, out = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "mmpt"
    assert {"multimodal", "contrastive", "mixture-of-experts", "image", "video", "audio", "text"} <= set(card.data.tags)
    assert card.data.datasets == ["digits", "speech", "motion", "motion-speech", "motion-sound"]
    found = {(r.task_type, r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("zero-shot-image-classification", "demo/val", "top1")] == 0.8
    assert found[("image-text-retrieval", "demo/val", "text_to_image/R@5")] == 0.8
    assert found[("image-to-text", "demo/val", "cider")] == 1.2
    assert not any("per_class" in key[2] or "num_" in key[2] for key in found), found
    assert "| zero-shot image classification | demo/val | 297 | top1 | 0.8000 |" in card.text
    info = model_info(load_pretrained(run_dir)[1])
    assert f"| parameters | {info['parameters']:,} |" in card.text
    assert f"| active parameters per token (encoder) | {info['active_parameters_per_token']:,} |" in card.text
    assert 'mmpt.from_pretrained("hf-hub:' in card.text
    dense = card_metadata(load_config("demo", ["model.moe.num_experts=0"]), [])
    assert "mixture-of-experts" not in dense["tags"] and "model-index" not in dense


def test_deepspeed_backend_run_loads_native_and_keeps_its_config(tmp_path, media):
    run_dir = make_run(tmp_path / "run", "model.moe.backend=deepspeed")
    out = export(run_dir, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model"]["moe"]["backend"] == "deepspeed"
    pretrained = from_pretrained(str(out))
    assert pretrained.cfg.model.moe.backend == "deepspeed"
    x = pretrained.preprocess["image"](media["image"].read_bytes())[None]
    with torch.no_grad():
        assert torch.isfinite(pretrained.model.encode("image", x)["emb"]).all()
    assert "No evaluation results" in (out / "README.md").read_text()


def test_openclip_wrapper_plugs_into_open_clip_zero_shot_classifier(exported, media):
    import open_clip

    from mmpt.eval.zeroshot import class_embeddings

    pretrained = from_pretrained(str(exported[1]))
    model = OpenClipModel(pretrained).eval()
    classnames, templates = ["zero", "three", "seven"], list(registry.get("image").templates)
    theirs = open_clip.build_zero_shot_classifier(model, pretrained.tokenizer, classnames, templates,
                                                  num_classes_per_batch=2)
    ours = class_embeddings(pretrained.model, classnames, templates, 16, pretrained.cfg.data.tokenizer)
    torch.testing.assert_close(theirs, ours.T)
    image = pretrained.preprocess["image"](media["image"].read_bytes())[None]
    with torch.no_grad():
        image_features, text_features, scale = model(image, pretrained.tokenizer(["a photo of a seven"]))
    assert image_features.shape == text_features.shape == (1, 32)
    torch.testing.assert_close(scale, pretrained.model.logit_scale("image-text"))


def test_huggingface_tokenizer_ships_with_the_export(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(WordLevel({"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "a": 4, "digit": 5, "seven": 6},
                                 unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    source = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(source)
    run_dir = make_run(tmp_path / "run", f"data.tokenizer={source}", "model.vocab_size=7", "model.sot_id=1",
                       "model.eot_id=2", "model.context_length=6")
    out = export(run_dir, tmp_path / "export")
    assert json.loads((out / "tokenizer.json").read_text())["kind"] == "huggingface"
    source.rename(tmp_path / "gone")  # the export must not need the training machine's tokenizer directory
    pretrained = from_pretrained(f"local-dir:{out}")
    assert pretrained.tokenizer(["a digit seven"]).tolist() == [[1, 4, 5, 6, 2, 0]]
    assert pretrained.preprocess["text"](b"a digit seven").tolist() == [1, 4, 5, 6, 2, 0]


def test_bad_inputs_are_one_line(exported, tmp_path):
    run_dir, out = exported
    cases = [(lambda: push(tmp_path / "missing", "org/name"), FileNotFoundError, "missing: not an export directory"),
             (lambda: push(out, "no-org"), DataError, "repo 'no-org': expected ORG/NAME"),
             (lambda: from_pretrained("s3://bucket/model"), DataError, "unknown scheme 's3:'"),
             (lambda: from_pretrained(str(tmp_path / "nope")), FileNotFoundError, "nope: no such export or run"),
             (lambda: from_pretrained(f"local-dir:{tmp_path}"), FileNotFoundError, "no model.safetensors"),
             (lambda: from_pretrained("hf-hub:just-a-name"), DataError, "expected hf-hub:ORG/NAME[@revision]"),
             (lambda: export(run_dir, tmp_path / "x", [tmp_path / "r.json"]), DataError, "r.json: no such file")]
    for call, error, text in cases:
        with pytest.raises(error) as info:
            call()
        assert text in str(info.value) and "\n" not in str(info.value), str(info.value)


HUB_SCRIPT = r"""
import json, sys
from pathlib import Path
from safetensors.torch import save_file
import torch
import mmpt
from mmpt.hub import HubError, push

export, repo, media, out, bad = sys.argv[1:6]
print("pushed", push(export, repo, private=True))
print("pushed", push(export, repo, revision="v1"))
try:
    push(export, repo, token=bad)
except HubError as e:
    print("error:", e)
for spec in (f"hf-hub:{repo}@nope", "hf-hub:mmpt-test/absent"):
    try:
        mmpt.from_pretrained(spec)
    except HubError as e:
        print("error:", e)
embs = {}
for spec in (f"hf-hub:{repo}", f"hf-hub:{repo}@v1", f"local-dir:{export}"):
    p = mmpt.from_pretrained(spec)
    with torch.no_grad():
        for m, path in json.loads(media).items():
            embs[f"{spec}|{m}"] = p.model.encode(m, p.preprocess[m](Path(path).read_bytes())[None])["emb"]
save_file(embs, out)
"""


def test_push_and_load_from_a_local_hub(exported, media, tmp_path):
    _, out = exported
    repo = "mmpt-test/tiny-moe"
    with HubServer(tmp_path / "hub", tokens=[FAKE_TOKEN]) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": FAKE_TOKEN, "HF_HOME": str(tmp_path / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1"}
        proc = run([sys.executable, "-c", HUB_SCRIPT, str(out), repo, json.dumps({m: str(p) for m, p in media.items()}),
                    str(tmp_path / "emb.safetensors"), BAD_TOKEN], env=env, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        exported_files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert hub.files(repo, "main") == exported_files == hub.files(repo, "v1")
        assert hub.store.meta(repo)["private"] is True
        assert f"Bearer {FAKE_TOKEN}" in hub.auth_seen and f"Bearer {BAD_TOKEN}" in hub.auth_seen
    assert FAKE_TOKEN not in output and BAD_TOKEN not in output
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and f"push to {repo} failed: 401" in errors[0] and "HF_TOKEN" in errors[0], errors
    assert f"hf-hub:{repo}@nope: download failed: revision not found" in errors[1], errors
    assert "hf-hub:mmpt-test/absent: download failed: repository not found" in errors[2], errors
    embs = load_file(str(tmp_path / "emb.safetensors"))
    for m in media:
        local = embs[f"local-dir:{out}|{m}"]
        assert torch.equal(embs[f"hf-hub:{repo}|{m}"], local) and torch.equal(embs[f"hf-hub:{repo}@v1|{m}"], local)
