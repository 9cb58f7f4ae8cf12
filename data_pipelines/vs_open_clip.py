"""`mmpt bench parity` under the name issue 22 and the older notes use: the same flags, the same one JSON object.

    python data_pipelines/vs_open_clip.py --mmpt-config photos --train data/cifar/train --val data/cifar/val \
        --classes data/cifar/classes.json --steps 200 --batch 32 --equal-time --out runs/parity_photos.json

The bench lives in mmpt/bench/parity.py (docs/benchmarks.md); this file only keeps the old command working.
"""
from __future__ import annotations

import sys

from mmpt.bench import run_bench

if __name__ == "__main__":
    sys.exit(run_bench("parity", sys.argv[1:]))
