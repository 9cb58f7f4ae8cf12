"""data_pipelines/demo_report.py: one run's table, the spread over several runs, captions naming their digit."""
from __future__ import annotations

import json
import sys

from tests.conftest import run


def write_run(path, top1: float, hypotheses: list) -> None:
    path.mkdir()
    for name in ("zeroshot.json", "zeroshot_audio.json", "zeroshot_audio_seen.json", "zeroshot_video.json"):
        (path / name).write_text(json.dumps({"top1": top1, "num_samples": 10, "chance_top1": 0.1}))
    refs = ["a handwritten digit four", "handwriting: 7", "the digit nine"]
    samples = [{"key": str(i), "hypothesis": h, "references": [r]}
               for i, (h, r) in enumerate(zip(hypotheses, refs, strict=True))]
    pair = {"video_to_audio": {"R@1": top1 / 4}, "audio_to_video": {"R@1": top1 / 5}}
    (path / "retrieval_video-audio.json").write_text(json.dumps({**pair, "num_samples": 100, "class_only_R@1": 0.1}))
    (path / "caption.json").write_text(json.dumps({"bleu4": 0.1, "cider": 1.0, "samples": samples}))


def test_report_over_runs_gives_mean_spread_worst_and_captions(tmp_path):
    write_run(tmp_path / "a", 0.95, ["a photo of the digit four", "a small hand drawn seven", "the digit one"])
    write_run(tmp_path / "b", 0.85, ["the number 4", "a handwritten one", "a blurry nine"])
    one = run([sys.executable, "data_pipelines/demo_report.py", str(tmp_path / "a")])
    assert one.returncode == 0, one.stderr
    assert "top-1 0.950" in one.stdout and "2 of 3 name their digit" in one.stdout
    both = run([sys.executable, "data_pipelines/demo_report.py", str(tmp_path / "a"), str(tmp_path / "b")])
    assert both.returncode == 0, both.stderr
    image = next(line for line in both.stdout.splitlines() if line.strip().startswith("image"))
    assert "mean 0.900 ± 0.071" in image and "worst 0.850" in image and "target 0.90 NOT met by the worst" in image
    assert both.stdout.count("2 of 3 name their digit") == 2
    pair = next(line for line in both.stdout.splitlines() if line.strip().startswith("video-audio"))
    assert "worse direction 0.190 / 0.170" in pair and "class-only ceiling 0.10" in pair
    assert "target 0.20 NOT met by the worst" in pair
