"""The demo's held-out zero-shot figures in one table (`make demo` prints it last).

    python data_pipelines/demo_report.py runs/demo
    python data_pipelines/demo_report.py runs/demo runs/demo-seed1 runs/demo-seed2     # mean, spread, worst

Reads the zero-shot JSONs `make demo` writes into the run folder and prints top-1 per modality next to
chance and the demo's targets, and video-audio retrieval's R@1 (the worse direction) beside the class-only
ceiling; a missing file is reported as such. Given several runs (e.g. `make demo RUN=runs/demo-seed1
DEMO_ARGS=train.seed=1`), it prints each modality's mean, standard deviation and worst run; a target is met
when the worst run meets it.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

# (file in the run folder, what it measures, target top-1)
ROWS = [("zeroshot.json", "image: held-out handwritten digits", 0.90),
        ("zeroshot_audio.json", "audio: spoken digits, voices never heard in training", 0.70),
        ("zeroshot_audio_seen.json", "audio: spoken digits, the training voices", None),
        ("zeroshot_video.json", "video: held-out digits moving", 0.60)]


def row(run: Path, name: str, what: str, target) -> str:
    path = run / name
    if not path.is_file():
        return f"{what:<56} {'missing: ' + str(path)}"
    result = json.loads(path.read_text())
    top1, n = result["top1"], result["num_samples"]
    mark = "" if target is None else f"  target {target:.2f} {'met' if top1 >= target else 'NOT met'}"
    return f"{what:<56} top-1 {top1:.3f} (chance {result['chance_top1']:.2f}, {n} samples){mark}"


PAIR_FILE, PAIR_WHAT, PAIR_TARGET = ("retrieval_video-audio.json", "video-audio: held-out motion clips, R@1", 0.20)


def pair_r1(result: dict) -> float:
    """The worse of the two directions' R@1 (a target holds for both)."""
    return min(v["R@1"] for v in result.values() if isinstance(v, dict) and "R@1" in v)


def pair_row(runs: list) -> str:
    """Video-audio retrieval's worse direction, with the R@1 that knowing only the digit would give."""
    paths = [run / PAIR_FILE for run in runs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return f"{PAIR_WHAT:<56} missing: {', '.join(missing)}"
    results = [json.loads(p.read_text()) for p in paths]
    r1 = [pair_r1(r) for r in results]
    ceiling = next((r["class_only_R@1"] for r in results if r.get("class_only_R@1") is not None), None)
    bound = "" if ceiling is None else f", class-only ceiling {ceiling:.2f}"
    worst = min(r1)
    return (f"{PAIR_WHAT:<56} worse direction {' / '.join(f'{x:.3f}' for x in r1)} (chance "
            f"{1 / results[0]['num_samples']:.2f}{bound})  target {PAIR_TARGET:.2f} "
            f"{'met' if worst >= PAIR_TARGET else 'NOT met'}{' by the worst' if len(runs) > 1 else ''}")


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def named_digit(text: str):
    """The digit a caption names, as a word ("four") or a numeral ("handwriting: 4"); None if it names none."""
    for token in re.findall(r"[a-z]+|\d", text.lower()):
        if token in DIGITS:
            return DIGITS.index(token)
        if token.isdigit():
            return int(token)
    return None


def caption_row(run: Path) -> str:
    """Captioning of the held-out images: BLEU-4, CIDEr and how many captions name their reference's digit."""
    path = run / "caption.json"
    if not path.is_file():
        return f"{'captions: held-out handwritten digits':<56} missing: {path}"
    result = json.loads(path.read_text())
    samples = result["samples"]
    digits = [(named_digit(s["hypothesis"]), named_digit(s["references"][0])) for s in samples]
    right = sum(ref is not None and hyp == ref for hyp, ref in digits)
    return (f"{'captions: held-out handwritten digits':<56} {right} of {len(samples)} name their digit "
            f"(BLEU-4 {result['bleu4']:.3f}, CIDEr {result['cider']:.3f})")


def over_runs(runs: list, name: str, what: str, target) -> str:
    paths = [run / name for run in runs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return f"{what:<56} missing: {', '.join(missing)}"
    top1 = [json.loads(p.read_text())["top1"] for p in paths]
    worst = min(top1)
    mark = "" if target is None else f"  target {target:.2f} {'met' if worst >= target else 'NOT met'} by the worst"
    return (f"{what:<56} top-1 mean {statistics.fmean(top1):.3f} ± {statistics.stdev(top1):.3f} (std), "
            f"worst {worst:.3f}, runs {' / '.join(f'{t:.3f}' for t in top1)}{mark}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args(argv)
    if len(args.runs) == 1:
        print(f"held-out zero-shot top-1 of {args.runs[0]}:")
        for name, what, target in ROWS:
            print("  " + row(args.runs[0], name, what, target))
        print("  " + pair_row(args.runs))
        print("  " + caption_row(args.runs[0]))
        return 0
    print(f"held-out zero-shot top-1 over {len(args.runs)} runs ({', '.join(map(str, args.runs))}):")
    for name, what, target in ROWS:
        print("  " + over_runs(args.runs, name, what, target))
    print("  " + pair_row(args.runs))
    for run in args.runs:
        print("  " + caption_row(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
