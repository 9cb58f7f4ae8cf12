"""Zero-shot classification and retrieval: shards, ImageFolder folders and manifests; batch-size and rank-count
independence (1 and 2 real gloo ranks equal one process exactly); retrieval ranks on hand-built matrices,
checked against torchmetrics; bad input as one-line errors."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from mmpt.config import load_config
from mmpt.data.build import build_shards, folder_rows
from mmpt.data.shards import write_shards
from mmpt.errors import DataError
from mmpt.eval.data import Classes, eval_batches
from mmpt.eval.retrieval import (
    class_only_r1,
    embedding_ranks,
    gather_unique,
    positive_ranks,
    rank_metrics,
    retrieval_metrics,
    run_retrieval,
)
from mmpt.eval.templates import TEMPLATE_SETS
from mmpt.eval.zeroshot import load_classes, run_zeroshot
from mmpt.export import load_pretrained
from tests.distributed import run_distributed
from tests.media_files import make_video

CLASSES = ["zero", "one", "two", "three", "four"]
SMALL = ["model.width=32", "model.heads=2", "model.depth=2", "model.embed_dim=16", "eval.workers=0"]
N = 40


def noise_png(seed: int) -> bytes:
    """Four random colour quadrants plus noise: a random-weight model tells these apart (pure noise, or one
    flat colour that the stem's normalisation divides out, all looks alike)."""
    rng = np.random.default_rng(seed)
    quads = np.kron(rng.integers(0, 256, (2, 2, 3)), np.ones((10, 10, 1)))
    pixels = np.clip(quads + rng.normal(0, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def export_model(out, overrides: list):
    """A random-weight demo-config model (MoE in both layers) saved as an export directory."""
    cfg = load_config("demo", SMALL + overrides)
    torch.manual_seed(0)
    from mmpt.model import build_for_run

    model = build_for_run(cfg)
    out.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder (folders 0..4, no captions), a CSV manifest of the same images, shards built from the
    folder (label-only samples), and captioned shards for retrieval."""
    root = tmp_path_factory.mktemp("eval")
    folder, rows = root / "folder", []
    for i in range(N):
        path = folder / f"{i % 5}" / f"{i:03d}.png"  # numbered class folders
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(i))
        rows.append({"image": path.relative_to(folder).as_posix(), "label": i % 5})
    with (folder.parent / "manifest.csv").open("w", newline="") as f:  # paths relative to the manifest
        writer = csv.DictWriter(f, ["image", "label"])
        writer.writeheader()
        writer.writerows({"image": f"folder/{r['image']}", "label": r["label"]} for r in rows)
    summary = build_shards(folder_rows(folder, labels_from_folders=True), ".", root / "shards", "ev", shard_size=4)
    assert summary["written"] == N
    write_shards(({"__key__": f"p{i:03d}", "png": noise_png(i), "txt": f"picture number {i} of class {CLASSES[i % 5]}",
                   "json": {"label": i % 5}} for i in range(N)), root / "pairs", "pairs", 4)
    (root / "classes.json").write_text(json.dumps({"classnames": CLASSES}))
    model = export_model(root / "model", [])
    return {k: str(v) for k, v in dict(folder=folder, manifest=root / "manifest.csv", shards=root / "shards",
                                       pairs=root / "pairs", classes=root / "classes.json", model=model,
                                       root=root).items()}


def zeroshot(data, spec: str, model: str = "model", **kw) -> dict:
    model, cfg = load_pretrained(data[model])
    return run_zeroshot(model, cfg, "image", data=data[spec], classes=data["classes"], **kw)


# The demo's MoE (dropless top-1 token choice), and routers whose training routing depends on the batch: token
# choice dropping at a small capacity and expert choice. Eval routing is per token for all of them.
ROUTERS = {"demo": [], "dropping": ["model.moe.drop_tokens=true", "model.moe.eval_capacity_factor=0.5"],
           "expert_choice": ["model.moe.router=expert_choice"]}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_zeroshot_result_does_not_depend_on_batch_size(data, router, tmp_path):
    data = {**data, "moe": str(export_model(tmp_path / "moe", ROUTERS[router]))}
    small = zeroshot(data, "shards", "moe", batch_size=7, png=tmp_path / "confusion.png")
    large = zeroshot(data, "shards", "moe", batch_size=64, workers=2)
    assert small == large
    assert set(small) == {"top1", "top5", "per_class_accuracy", "confusion", "num_samples", "num_classes",
                          "chance_top1", "skipped", "data", "modality", "templates"}
    assert small["num_samples"] == N and small["num_classes"] == 5 and small["skipped"] == 0
    assert small["top5"] == 1.0  # top-5 of 5 classes holds every class
    assert sum(map(sum, small["confusion"])) == N and [sum(r) for r in small["confusion"]] == [8] * 5
    # predictions vary with the sample; an untrained model has hub classes, so two is what it reliably gives
    assert sum(any(row[c] for row in small["confusion"]) for c in range(5)) >= 2
    assert small["per_class_accuracy"]["one"] == small["confusion"][1][1] / 8
    assert small["top1"] == sum(small["confusion"][c][c] for c in range(5)) / N
    assert small["templates"] == 4  # the registry's image defaults: the classes file has none
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 200


def test_folder_manifest_and_shards_give_the_same_result(data):
    shards = zeroshot(data, "shards", batch_size=8)
    for spec in ("folder", "manifest"):
        other = zeroshot(data, spec, batch_size=5, workers=2 if spec == "folder" else 0)
        assert {k: v for k, v in other.items() if k != "data"} == {k: v for k, v in shards.items() if k != "data"}
    assert zeroshot(data, "pairs", batch_size=8)["confusion"] == shards["confusion"]  # captioned samples too
    photo = zeroshot(data, "folder", batch_size=8, templates="photo")
    assert photo["templates"] == len(TEMPLATE_SETS["photo"]) and photo["num_samples"] == N


def _distributed_evals(rank, world, data):
    torch.set_num_threads(1)
    _, cfg = load_pretrained(data["model"])
    seen = [len(b["__key__"]) for spec in ("shards", "folder")
            for b in eval_batches(data[spec], ["image"], cfg, 8, 0, labels=True,
                                  classes=Classes(CLASSES, data["classes"]))]
    return (zeroshot(data, "shards", batch_size=5), zeroshot(data, "folder", batch_size=4),
            _retrieval(data, batch_size=6)), sum(seen)


def _retrieval(data, **kw) -> dict:
    model, cfg = load_pretrained(data["model"])
    return run_retrieval(model, cfg, ["text", "image"], data["pairs"], **kw)


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_give_exactly_the_single_process_result(data, world):
    single = (zeroshot(data, "shards", batch_size=64), zeroshot(data, "folder", batch_size=64),
              _retrieval(data, batch_size=64))
    results = run_distributed(_distributed_evals, world, data)
    assert sum(seen for _, seen in results) == 2 * N  # each rank decoded only its split of shards and folder
    for per_rank, _ in results:
        assert per_rank == single


def test_gathered_samples_count_once_by_key():
    emb = torch.arange(8.0).view(4, 2)
    keys, a, b, skipped, labels = gather_unique(["k2", "k1", "k2", "k0"], emb, -emb, 3, [5, 4, 5, 3])
    assert keys == ["k0", "k1", "k2"] and skipped == 3 and labels == [3, 4, 5]
    assert a.tolist() == [[6, 7], [2, 3], [0, 1]] and torch.equal(b, -a)


def test_class_only_r1_is_the_ceiling_of_class_knowledge():
    """Embeddings that are their class's one-hot plus tiny per-sample noise: R@1 over many draws averages to
    class_only_r1 (one in n_c same-class candidates comes first), far below 1."""
    labels = [0] * 4 + [1] * 2 + [2]
    assert math.isclose(class_only_r1(labels), (4 * 0.25 + 2 * 0.5 + 1.0) / 7)
    assert class_only_r1([0, -1]) is None and class_only_r1([]) is None
    g = torch.Generator().manual_seed(0)
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), 3).double()
    hits = [rank_metrics(embedding_ranks(onehot + 1e-3 * torch.randn(7, 3, generator=g, dtype=torch.float64),
                                         onehot + 1e-3 * torch.randn(7, 3, generator=g, dtype=torch.float64)))
            ["R@1"] for _ in range(2000)]
    assert abs(sum(hits) / len(hits) - class_only_r1(labels)) < 0.02


def test_retrieval_result_keys_and_counts(data):
    result = _retrieval(data, batch_size=7)
    assert result["pair"] == "image-text" and result["num_samples"] == N and result["skipped"] == 0
    assert math.isclose(result["class_only_R@1"], 5 / N)  # the pairs' json labels: 5 classes of N / 5 samples
    for direction in ("image_to_text", "text_to_image"):
        metrics = result[direction]
        assert set(metrics) == {"R@1", "R@5", "R@10", "median_rank"}
        assert metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1.0 and 1 <= metrics["median_rank"] <= N


def test_retrieval_metrics_on_hand_built_matrices():
    # Row i's positive is column i. Ranks a -> b: 1, 2, 3, 1; b -> a (columns as queries): 1, 2, 1, 1.
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.2],
                        [0.8, 0.5, 0.1, 0.0],
                        [0.7, 0.6, 0.3, 0.1],
                        [0.0, 0.1, 0.2, 0.4]])
    assert positive_ranks(sim).tolist() == [1, 2, 3, 1]
    assert positive_ranks(sim.t()).tolist() == [1, 2, 1, 1]
    a_to_b, b_to_a = retrieval_metrics(sim)
    assert a_to_b == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.5}
    assert b_to_a == {"R@1": 0.75, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}
    assert rank_metrics(torch.tensor([12, 1, 7]), ks=(1, 5, 10)) == {"R@1": 1 / 3, "R@5": 1 / 3, "R@10": 2 / 3,
                                                                      "median_rank": 7.0}
    # Equal scores (duplicate captions) count for the query.
    assert positive_ranks(torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])).tolist() == [1, 2, 1]


def test_ranks_agree_with_torchmetrics_and_blocks():
    from torchmetrics.retrieval import RetrievalRecall

    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(a + 0.8 * torch.randn(50, 8, generator=gen), dim=-1)
    sim = a @ b.t()
    ranks = positive_ranks(sim)
    assert torch.equal(embedding_ranks(a, b, block=7), ranks)
    indexes = torch.arange(50)[:, None].expand(50, 50)
    for k in (1, 5, 10):
        recall = RetrievalRecall(top_k=k)(sim.reshape(-1), torch.eye(50, dtype=torch.bool).reshape(-1),
                                          indexes=indexes.reshape(-1))
        assert rank_metrics(ranks)[f"R@{k}"] == pytest.approx(float(recall), abs=1e-6)


def test_video_audio_and_video_text_retrieval_from_a_manifest(tmp_path):
    rows = []
    for i, seconds in enumerate((1.0, 1.5, 2.0)):
        make_video(tmp_path / f"v{i}.mp4", seconds=seconds, audio=True)
        rows.append({"video": f"v{i}.mp4", "text": f"clip {i}"})
    rows.append({"video": "missing.mp4", "text": "gone"})
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, cfg = load_pretrained(export_model(tmp_path / "model", []))
    for pair in (["audio", "video"], ["video", "text"]):  # audio: the mp4's sound track
        result = run_retrieval(model, cfg, pair, str(tmp_path / "clips.jsonl"), batch_size=2, workers=0)
        assert result["num_samples"] == 3 and result["skipped"] == 1
        assert result["pair"] in ("video-audio", "video-text")


def test_bad_input_is_one_line_naming_the_problem(data, tmp_path):
    model, cfg = load_pretrained(data["model"])
    plain = load_pretrained(export_model(tmp_path / "imgonly", ["model.modalities=[image, text]",
                                                                "data.sources=[{name: a, shards: x, "
                                                                "modalities: [image, text]}]"]))
    with pytest.raises(DataError, match="zero-shot needs audio and text; the model has no audio"):
        run_zeroshot(*plain, "audio", data=data["shards"], classes=data["classes"])
    with pytest.raises(DataError, match="retrieval needs video and text; the model has no video"):
        run_retrieval(*plain, ["video", "text"], data["pairs"])
    (tmp_path / "noclass.json").write_text(json.dumps({"templates": ["{}"]}))
    with pytest.raises(DataError, match="noclass.json: 'classnames' must be a non-empty list"):
        run_zeroshot(model, cfg, "image", data=data["shards"], classes=str(tmp_path / "noclass.json"))
    with pytest.raises(DataError, match="templates='faces': no such template set"):
        run_zeroshot(model, cfg, "image", data=data["shards"], classes=data["classes"], templates="faces")
    unlabelled = ({"__key__": f"u{i}", "png": noise_png(i), "txt": "x"} for i in range(3))
    write_shards(unlabelled, tmp_path / "nolabel", "u", 2)
    with pytest.raises(DataError, match=r"3 sample\(s\) without a label \(e.g. key u0\)"):
        run_zeroshot(model, cfg, "image", data=str(tmp_path / "nolabel"), classes=data["classes"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no samples"):
        run_zeroshot(model, cfg, "image", data=str(tmp_path / "empty"), classes=data["classes"])
    (tmp_path / "bad.csv").write_text("image,label\nfolder/0/000.png,cat\n")
    with pytest.raises(DataError, match=r"bad.csv: row 1: label 'cat' is not a class index"):
        run_zeroshot(model, cfg, "image", data=str(tmp_path / "bad.csv"), classes=data["classes"])


def test_unusable_labels_and_metadata_are_skipped_and_counted_not_raised(data, tmp_path):
    model, cfg = load_pretrained(data["model"])
    named = ({"__key__": f"n{i}", "png": noise_png(i), "json": {"label": "cat" if i == 0 else i}} for i in range(4))
    write_shards(named, tmp_path / "named", "n", 2)
    result = run_zeroshot(model, cfg, "image", data=str(tmp_path / "named"), classes=data["classes"], workers=0)
    assert (result["num_samples"], result["skipped"]) == (3, 1)
    folder = tmp_path / "folder" / "zero"
    folder.mkdir(parents=True)
    for i in range(2):
        (folder / f"{i}.png").write_bytes(noise_png(i))
    (folder / "1.json").write_text("{oops")  # a sidecar `shards build` would refuse
    result = run_zeroshot(model, cfg, "image", data=str(tmp_path / "folder"), classes=data["classes"], workers=0)
    assert (result["num_samples"], result["skipped"]) == (1, 1)
    cfg.eval.top_k = [1, 10]  # more than the 5 classes: k is clipped, every class is in the top 10 (README)
    assert run_zeroshot(model, cfg, "image", data=data["shards"], classes=data["classes"])["top10"] == 1.0


def test_template_sets_and_their_precedence(data, tmp_path):
    for name, prompts in TEMPLATE_SETS.items():
        assert 8 <= len(prompts) <= 20 and all("{}" in p for p in prompts), name
        assert len(set(prompts)) == len(prompts), name
    (tmp_path / "own.json").write_text(json.dumps({"classnames": CLASSES, "templates": ["{} here"]}))
    assert load_classes(tmp_path / "own.json", "audio")[1] == ["{} here"]
    assert load_classes(tmp_path / "own.json", "audio", "sound")[1] == list(TEMPLATE_SETS["sound"])
    assert load_classes(data["classes"], "audio")[1][0] == "the sound of {}."  # the registry's defaults


def class_folder(root, files: dict):
    """{class folder: number of PNGs} as an ImageFolder under root; 0 makes an empty folder."""
    for name, n in files.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(noise_png(i))
    return str(root)


@pytest.mark.parametrize("names", [CLASSES, [c.upper() for c in CLASSES], [str(c) for c in range(5)]],
                         ids=["classnames", "loose-names", "numbered"])
def test_folder_labels_follow_the_classes_file_past_a_missing_class(data, tmp_path, caplog, names):
    # Class 2 has an empty folder (or none): the classes after it keep their own labels, told apart here
    # by their sample counts (class c has c + 1 files), i.e. by the confusion matrix's row sums.
    files = {names[c]: c + 1 for c in (0, 1, 3, 4)} | ({names[2]: 0} if names is CLASSES else {})
    model, cfg = load_pretrained(data["model"])
    result = run_zeroshot(model, cfg, "image", data=class_folder(tmp_path / "f", files), classes=data["classes"],
                          batch_size=4, workers=0)
    assert [sum(row) for row in result["confusion"]] == [1, 2, 0, 4, 5]
    assert result["per_class_accuracy"]["two"] is None and result["num_samples"] == 12
    assert "1 of 5 classes of classes file" in caplog.text and "'two'" in caplog.text


@pytest.mark.parametrize("folders, message", [
    (["zero", "seven"], r"class folder 'seven' names no class of classes file .*classes.json \(name each folder"),
    (["0", "7"], r"class folder '7' is no class index of classes file .*classes.json \(5 classnames: 0..4\)"),
    (["zero", "1"], r"class folder '1' names no class of classes file"),  # names and numbers mixed
    ([".", "zero"], r"class folder '.' \(files directly in it\) names no class"),
])
def test_class_folders_naming_no_class_are_one_line_errors(data, tmp_path, folders, message):
    root = tmp_path / "f"
    class_folder(root, {f: 1 for f in folders if f != "."})
    if "." in folders:
        (root / "loose.png").write_bytes(noise_png(9))
    model, cfg = load_pretrained(data["model"])
    with pytest.raises(DataError, match=message) as error:
        run_zeroshot(model, cfg, "image", data=str(root), classes=data["classes"], workers=0)
    assert "\n" not in str(error.value) and str(root) in str(error.value)
