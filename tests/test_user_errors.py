"""Every user mistake is one line on stderr, `mmpt <command>: error: <message naming the key or file>`, and exit
code 2 (README: "Every user error is one line with exit code 2"). The real CLI runs in a subprocess for each row
of the table, in a temp dir (a row that wrongly passed would find no data to train on there); the rows run
concurrently once per module (each is mostly interpreter and torch start-up), and each row is its own test case.

Placeholders in a row's argv name the inputs the `inputs` fixture writes: {model} an image-text model (random
weights, no video or audio), {tmp} the folder of the other files."""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import run
from tests.test_eval import export_model
from tests.test_tokenizer import gpt2_style_tokenizer

IMAGE_ONLY = ["model.modalities=[image, text]", "data.sources=[{name: a, shards: x, modalities: [image, text]}]"]

ROWS = [
    # config values out of range: validation stops `mmpt train` before any process group starts
    ("heads", ["train", "--config", "demo", "model.heads=0"], "model.heads=0: must be positive"),
    ("patch", ["train", "--config", "demo", "model.patch_size=0"], "model.patch_size=0: must be positive"),
    ("tubelet", ["train", "--config", "demo", "model.video.tubelet=0"], "model.video.tubelet=0: must be positive"),
    ("conv_patch", ["train", "--config", "demo", "model.patch_size=12", "model.image_size=36"],
     "model.patch_size=12: must be a power of two >= 2 with model.stem=conv"),
    ("ep_size", ["train", "--config", "demo", "model.moe.ep_size=0"], "model.moe.ep_size=0: must be positive"),
    ("log_every", ["train", "--config", "demo", "train.log_every=0"], "train.log_every=0: must be positive"),
    ("ckpt_every", ["train", "--config", "demo", "train.ckpt_every=0"], "train.ckpt_every=0: must be positive"),
    ("num_workers", ["train", "--config", "demo", "data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    ("lr", ["train", "--config", "demo", "optim.lr=-1"], "optim.lr=-1.0: must be positive"),
    ("betas", ["train", "--config", "demo", "optim.betas=[0.9]"], "optim.betas=[0.9]: needs two values in [0, 1)"),
    ("eps", ["train", "--config", "demo", "optim.eps=0"], "optim.eps=0.0: must be positive"),
    ("weight_decay", ["train", "--config", "demo", "optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be >= 0"),
    ("top_k", ["train", "--config", "demo", "eval.top_k=[0, 5]"], "eval.top_k=[0, 5]: needs one or more positive k"),
    ("context", ["train", "--config", "demo", "model.context_length=1"], "model.context_length=1: must be >= 2"),
    ("frames", ["train", "--config", "demo", "data.video.num_frames=1"], "fewer than model.video.tubelet=2 frames"),
    ("augment", ["train", "--config", "demo", "data.augment.image.scale=[1.2, 0.5]"],
     "data.augment.image.scale=[1.2, 0.5]: needs [min, max] with 0 < min <= max <= 1"),
    ("source_augment", ["train", "--config", "demo", "data.sources.1.augment={{audio: {{noise_p: 2}}}}"],
     "data.sources[1].augment.audio.noise_p=2.0: must be a probability in [0, 1]"),
    # indexed overrides
    ("index_range", ["train", "--config", "demo", "eval.zeroshot.1.modality=audio"],
     "override 'eval.zeroshot.1.modality': eval.zeroshot is a list of 1; '1' is not an index 0..0"),
    ("index_value", ["train", "--config", "demo", "model.width.0=3"], "model.width=128 is a value, not a section"),
    ("index_absent", ["train", "--config", "demo", "optim.betas.1=0.99"], "optim.betas is not in the config file"),
    ("yaml", ["train", "--config", "demo", "model.width=[1"], "override 'model.width': cannot parse value '[1'"),
    # tokenizers that would empty every caption, or none at all
    ("gpt2_tokenizer", ["train", "--config", "demo", "data.tokenizer={tmp}/gpt2"],
     "begin and end tokens share id 0 (GPT-2 style bos == eos)"),
    # usage
    ("no_model", ["eval", "zeroshot"], "the following arguments are required: --model"),
    ("workers", ["eval", "zeroshot", "--model", "{model}", "--workers", "-1"], "argument --workers: -1: must be >= 0"),
    # evaluation
    ("missing_model", ["eval", "retrieval", "--model", "{tmp}/nothing"], "nothing: no such export or run directory"),
    ("bad_run_config", ["eval", "zeroshot", "--model", "{tmp}/badrun"], "badrun/config.yaml: model.heads=0"),
    ("no_video", ["eval", "zeroshot", "--model", "{model}", "--modality", "video"],
     "zero-shot needs video and text; the model has no video (its modalities: image, text)"),
    ("no_pair", ["eval", "retrieval", "--model", "{model}", "--pair", "video-text"],
     "retrieval needs video and text; the model has no video"),
    ("pair_spelling", ["eval", "retrieval", "--model", "{model}", "--pair", "image"], "--pair 'image': expected two"),
    ("no_classnames", ["eval", "zeroshot", "--model", "{model}", "--classes", "{tmp}/noclass.json"],
     "noclass.json: 'classnames' must be a non-empty list"),
    ("classes_dir", ["eval", "zeroshot", "--model", "{model}", "--classes", "{tmp}"], "classes file"),
    ("manifest_label", ["eval", "zeroshot", "--model", "{model}", "--data", "{tmp}/labels.csv", "--classes",
                        "{tmp}/classes.json"], "labels.csv: row 1: label 'cat' is not a class index"),
    # export --results
    ("results_missing", ["export", "--run", "{model}", "--out", "{tmp}/x", "--results", "{tmp}/none.json"],
     "results file {tmp}/none.json: no such file"),
    ("results_not_json", ["export", "--run", "{model}", "--out", "{tmp}/x", "--results", "{tmp}/notjson.json"],
     "results file {tmp}/notjson.json: invalid JSON"),
    ("results_shape", ["export", "--run", "{model}", "--out", "{tmp}/x", "--results", "{tmp}/numbers.json"],
     "numbers.json: expected an eval result object"),
    # training that would fail hours in: eval data checked at start
    ("eval_data", ["train", "--config", "demo",
                   "data.sources=[{{name: d, shards: {data}/train, modalities: [image, text]}}]",
                   "model.modalities=[image, text]", "eval.every=5", "data.val={tmp}/nope",
                   "data.classes={data}/classes.json"], "shards '{tmp}/nope': no such directory or file"),
    # shards
    ("sizes_shape", ["shards", "check", "{tmp}/badsizes"], "badsizes/sizes.json: expected an object"),
    ("manifest_line", ["shards", "build", "--manifest", "{tmp}/rows.jsonl", "--out", "{tmp}/s", "--prefix", "s"],
     "rows.jsonl:2: expected a JSON object per line"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_data) -> dict:
    tmp = tmp_path_factory.mktemp("mistakes")
    export_model(tmp / "model", IMAGE_ONLY)
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "config.yaml").write_text("model: {heads: 0}\n")
    (tmp / "noclass.json").write_text(json.dumps({"templates": ["a photo of {}."]}))
    (tmp / "classes.json").write_text(json.dumps({"classnames": ["cat", "dog"]}))
    (tmp / "labels.csv").write_text("image,label\ncat.png,cat\n")
    (tmp / "notjson.json").write_text("top1: 0.5\n")
    (tmp / "numbers.json").write_text("[1, 2]\n")
    (tmp / "badsizes").mkdir()
    (tmp / "badsizes" / "sizes.json").write_text('["a-000000.tar"]\n')
    (tmp / "rows.jsonl").write_text('{"image": "a.png", "text": "a cat"}\n["b.png", "a dog"]\n')
    gpt2_style_tokenizer(tmp / "gpt2")
    return {"model": str(tmp / "model"), "tmp": str(tmp), "data": str(demo_data)}


@pytest.fixture(scope="module")
def outcomes(inputs) -> dict:
    """Every row's finished CLI process, by row name."""
    def cli(argv: list):
        return run([sys.executable, "-m", "mmpt.cli", *(a.format(**inputs) for a in argv)], timeout=300,
                   cwd=inputs["tmp"])

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return dict(zip([r[0] for r in ROWS], pool.map(cli, [r[1] for r in ROWS]), strict=True))


@pytest.mark.parametrize("name, argv, expected", ROWS, ids=[row[0] for row in ROWS])
def test_user_error_is_one_line_with_exit_code_2(inputs, outcomes, name, argv, expected):
    proc = outcomes[name]
    command = " ".join(argv[:2]) if argv[0] in ("eval", "shards") else argv[0]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"mmpt {command}: error: ") and expected.format(**inputs) in lines[0], lines[0]
