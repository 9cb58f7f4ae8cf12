"""The demo's held-out zero-shot figures in one table (`make demo` prints it last).

    python data_pipelines/demo_report.py runs/demo

Reads the zero-shot JSONs `make demo` writes into the run folder and prints top-1 per modality next to chance
and the demo's targets; a missing file is reported as such.
"""
from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args(argv)
    print(f"held-out zero-shot top-1 of {args.run}:")
    for name, what, target in ROWS:
        print("  " + row(args.run, name, what, target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
