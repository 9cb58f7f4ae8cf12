"""Captioning: the KV-cached generate equals the full re-run, BLEU-4/CIDEr scoring, and run_caption on real
tiny shards (one process and two gloo ranks)."""
import json
import time
from contextlib import contextmanager

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mmpt.cli import main
from mmpt.config import load_config
from mmpt.data.shards import write_shards
from mmpt.errors import DataError
from mmpt.eval.caption import normalize, read_references, run_caption, score_captions
from mmpt.eval.zeroshot import run_zeroshot
from mmpt.model import build_model
from tests.distributed import run_distributed
from tests.media_files import png_bytes

IMAGE_TEXT = ["model.modalities=[image, text]", "data.sources=[{name: d, shards: d, modalities: [image, text]}]"]
SMALL = ["model.width=32", "model.depth=2", "model.heads=2", "model.embed_dim=16"]
CAPTIONS = ["a digit written by hand", "the number seven", "a small grey square", "two dogs play in the snow"]


def config(*overrides):
    return load_config("demo", [*IMAGE_TEXT, *overrides])


def seeded_model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg.model).eval()


def make_shards(path, n: int = 10, per_shard: int = 5) -> str:
    def samples():
        for i in range(n):
            meta = {"label": i % 3}
            if i % 2 == 0:  # COCO-style extra references; the first repeats the caption and counts once
                meta["captions"] = [CAPTIONS[i % 4], f"picture number {i}"]
            yield {"__key__": f"s{i:04d}", "png": png_bytes(32, 32, 20 * i), "txt": CAPTIONS[i % 4], "json": meta}
    write_shards(samples(), path, "cap", per_shard)
    return str(path)


def eot_biased(cfg, num_beams: int):
    """The demo model with EOT made likely enough that some rows and beams finish early and others do not:
    the smallest bias (scanned, so a change of architecture cannot silently make every row end at once)."""
    for scale in torch.arange(0.1, 0.6, 0.02).tolist():
        model = seeded_model(cfg)
        dec = model.decoder
        with torch.no_grad():
            v = torch.randn(cfg.model.width) * 0.1
            dec.ln.bias.copy_(v)
            dec.token.weight[cfg.model.eot_id] = scale * v / dec.token_scale  # the row as the LM head uses it
        src = model.encode("image", torch.randn(6, 3, 32, 32))
        mask = src["mask"].clone()
        mask[::2, 5:9] = False  # padded context tokens must stay masked in the cached cross-attention too
        full = dec.generate(src["hidden"], mask, num_beams=num_beams, use_cache=False)
        finished = (full == cfg.model.eot_id).any(1)
        if finished.any() and not finished.all():
            return dec, src["hidden"], mask, full
    raise AssertionError("no EOT bias gives some finished and some unfinished rows")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_kv_cache_gives_the_same_ids(num_beams):
    dec, hidden, mask, full = eot_biased(config(), num_beams)  # the demo model's width and decoder
    t = time.perf_counter()
    cached = dec.generate(hidden, mask, num_beams=num_beams, use_cache=True)
    t_cached = time.perf_counter() - t
    t = time.perf_counter()
    dec.generate(hidden, mask, num_beams=num_beams, use_cache=False)
    print(f"beams={num_beams}: full re-run {time.perf_counter() - t:.3f}s, KV cache {t_cached:.3f}s")
    assert torch.equal(full, cached)  # both paths of the search (rows ended early, rows running) included


def test_teacher_forcing_forward_is_untouched_by_generate():
    cfg = config(*SMALL)
    model = seeded_model(cfg)
    tokens = torch.randint(0, 1000, (2, cfg.model.context_length))
    tokens[:, 0], tokens[:, -1] = cfg.model.sot_id, cfg.model.eot_id
    src = model.encode("image", torch.randn(2, 3, 32, 32))
    before = model.decoder(tokens, src["hidden"], src["mask"])["caption_hidden"]
    model.decoder.generate(src["hidden"], src["mask"], num_beams=2)
    assert torch.equal(before, model.decoder(tokens, src["hidden"], src["mask"])["caption_hidden"])


def test_identical_captions_score_bleu4_one_and_cider_ten():
    hyps = {1: "A man riding a horse on the beach.", 2: "Two dogs play in the snow!", 3: "A plate of food, on a table"}
    refs = {k: [h.lower().replace(".", "").replace("!", "").replace(",", "")] for k, h in hyps.items()}
    scores = score_captions(hyps, refs)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(10.0, abs=1e-6)


def test_partial_match_scores_as_pycocoevalcap_and_by_hand():
    hyps = {1: "A dog runs on grass.", 2: "a cat sleeps on a red sofa", 3: "people walking in a city street"}
    refs = {1: ["a dog runs on sand"], 2: ["a cat is sleeping on the sofa", "a cat on a red couch"],
            3: ["a busy city street with people walking"]}
    scores = score_captions(hyps, refs)
    gts = {k: [normalize(r) for r in v] for k, v in refs.items()}
    res = {k: [normalize(h)] for k, h in hyps.items()}
    assert scores["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-12)
    assert scores["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    # One pair by hand: n-gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty).
    alone = score_captions({1: hyps[1]}, {1: refs[1]})
    assert alone["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    assert normalize("  A Dog's toy,  red! ") == "a dog s toy red"


def test_references_are_the_caption_plus_json_captions(tmp_path):
    refs = read_references(make_shards(tmp_path / "d"))
    assert len(refs) == 10
    assert refs["s0000"] == [CAPTIONS[0], "picture number 0"]  # the caption repeated in json counts once
    assert refs["s0001"] == [CAPTIONS[1]]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_run_caption_end_to_end_on_real_shards(tmp_path, num_beams):
    data = make_shards(tmp_path / "d")
    cfg = config(*SMALL)
    result = run_caption(seeded_model(cfg), cfg, "image", data, batch_size=4, num_beams=num_beams, max_len=8,
                         workers=0)
    assert {"bleu4", "cider", "num_samples", "modality", "num_beams", "samples"} <= set(result)
    assert (result["num_samples"], result["modality"], result["num_beams"]) == (10, "image", num_beams)
    assert 0.0 <= result["bleu4"] <= 1.0 and result["cider"] >= 0.0
    # every sample, not a few examples: its hypothesis and all its references
    refs = read_references(data)
    assert [e["key"] for e in result["samples"]] == [f"s{i:04d}" for i in range(10)]
    assert [e["references"] for e in result["samples"]] == [refs[f"s{i:04d}"] for i in range(10)]
    assert all(isinstance(e["hypothesis"], str) for e in result["samples"])
    json.dumps(result)  # the CLI writes it as JSON


def test_run_caption_refuses_a_model_without_decoder_or_modality(tmp_path):
    data = make_shards(tmp_path / "d", n=2)
    cfg = config(*SMALL, "model.decoder_cross_layers=0")
    with pytest.raises(DataError, match="no caption decoder"):
        run_caption(seeded_model(cfg), cfg, "image", data, workers=0)
    cfg = config(*SMALL)
    with pytest.raises(DataError, match="--modality audio: captioning needs one of the model's non-text"):
        run_caption(seeded_model(cfg), cfg, "audio", data, workers=0)
    with pytest.raises(DataError, match="--max-len 99"):
        run_caption(seeded_model(cfg), cfg, "image", data, max_len=99, workers=0)


def _caption_on_rank(rank, world, data):
    cfg = config(*SMALL)
    return run_caption(seeded_model(cfg), cfg, "image", data, batch_size=3, max_len=6, workers=0)


def test_two_ranks_gather_every_sample_once_and_agree(tmp_path):
    data = make_shards(tmp_path / "d", n=10, per_shard=3)  # 4 shards: rank 0 reads 2 (6 samples), rank 1 2 (4)
    results = run_distributed(_caption_on_rank, 2, data)
    assert results[0] == results[1]
    assert results[0]["num_samples"] == 10
    single = _caption_on_rank(0, 1, data)
    assert single["samples"] == results[0]["samples"]


@contextmanager
def stem_inputs(model, modality: str):
    """What the model's `modality` stem receives, batch by batch (a forward pre-hook on the real stem)."""
    seen: list = []
    handle = model.stems[model.plan[modality][0]].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_caption_encoder_gets_the_pixels_zero_shot_gives_it(tmp_path):
    data = make_shards(tmp_path / "d")
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": ["a", "b", "c"]}))  # labels i % 3
    cfg = config(*SMALL)
    model = seeded_model(cfg)
    with stem_inputs(model, "image") as zeroshot:
        run_zeroshot(model, cfg, "image", data=data, classes=str(tmp_path / "classes.json"), batch_size=4, workers=0)
    with stem_inputs(model, "image") as caption:
        run_caption(model, cfg, "image", data, batch_size=4, max_len=4, workers=0)
    zeroshot, caption = torch.cat(zeroshot), torch.cat(caption)
    assert caption.shape[0] == 10 and torch.equal(caption, zeroshot)
    assert caption.abs().max() < 3  # CLIP-normalised, not 0..255


def test_caption_cli_out_holds_every_sample(tmp_path):
    from safetensors.torch import save_file

    data = make_shards(tmp_path / "d", n=7, per_shard=3)
    cfg = config(*SMALL)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    state = {k: v.contiguous().clone() for k, v in seeded_model(cfg).state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    out = tmp_path / "caption.json"
    assert main(["eval", "caption", "--model", str(model_dir), "--data", data, "--out", str(out), "--max-len", "4",
                 "--workers", "0", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 7 and {"bleu4", "cider"} <= set(result)
    assert [(e["key"], e["references"]) for e in result["samples"]] == sorted(read_references(data).items())
    assert all(isinstance(e["hypothesis"], str) for e in result["samples"])
