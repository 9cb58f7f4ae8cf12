"""data_pipelines/demo_pair_probe.py: what each side of the video-audio pair knows, read on real motion shards."""
from __future__ import annotations

import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))

from demo_pair_probe import DIRS, named, probe, probes, text_similarity  # noqa: E402

from mmpt.config import load_config  # noqa: E402
from mmpt.eval.retrieval import run_retrieval  # noqa: E402
from mmpt.model import build_for_run  # noqa: E402


def test_named_scores_the_nearest_prompts_digit_and_direction():
    prompts, groups = torch.eye(40), torch.tensor([0, 5, 13, 39])
    assert named(prompts[groups], prompts, groups) == {"digit": 1.0, "direction": 1.0, "both": 1.0}
    next_direction = groups // 4 * 4 + (groups % 4 + 1) % 4
    assert named(prompts[next_direction], prompts, groups) == {"digit": 1.0, "direction": 0.0, "both": 0.0}


def test_text_similarity_tells_a_digit_built_embedding_from_a_direction_built_one():
    digit, direction = torch.randn(10, 64), torch.randn(4, 64)
    mixed = [torch.nn.functional.normalize(torch.stack([a * digit[d] + b * direction[r] for d in range(10)
                                                         for r in range(4)]), dim=-1) for a, b in ((3, 1), (1, 3))]
    by_digit, by_direction = text_similarity(mixed[0]), text_similarity(mixed[1])
    assert by_digit["same_digit"] > 0.8 > by_digit["same_direction"]
    assert by_direction["same_direction"] > 0.8 > by_direction["same_digit"]


def test_probes_find_the_attribute_the_embedding_holds_and_not_the_other():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(10, 16, generator=gen)

    def clips(n):  # the digit linearly in the embedding, the direction nowhere
        groups = torch.randint(0, 40, (n,), generator=gen)
        emb = codes[groups // len(DIRS)] + 0.1 * torch.randn(n, 16, generator=gen)
        return {"video": emb, "audio": emb}, groups

    result = probes(clips(400), clips(200))
    for side in ("video", "audio"):
        assert result[side]["digit"] > 0.95
        assert result[side]["direction"] < 0.45  # chance is 0.25


def test_probe_of_real_clips_agrees_with_the_retrieval_eval(demo_data):
    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_for_run(cfg).eval()
    val = demo_data / "motion-val"
    result = probe(model, cfg, val)
    retrieval = run_retrieval(model, cfg, ["video", "audio"], str(val))
    assert result["num_clips"] == retrieval["num_samples"] == 100
    assert result["pair"]["video_to_audio_R@1"] == retrieval["video_to_audio"]["R@1"]
    assert result["pair"]["audio_to_video_R@1"] == retrieval["audio_to_video"]["R@1"]
    groups = Counter()
    for shard in val.glob("*.tar"):
        with tarfile.open(shard) as tar:
            groups.update((meta["label"], meta["direction"]) for meta in
                          (json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")))
    # Each clip finds its own first one time in (clips of its group): the mean of 1 / size over clips.
    assert abs(result["pair"]["ceiling_R@1"] - len(groups) / 100) < 1e-12
    assert all(0.0 <= v <= 1.0 for side in result["zeroshot"].values() for v in side.values())
