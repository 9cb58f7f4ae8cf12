"""Training curves of a run from its metrics.jsonl, as PNG files (matplotlib, Agg: no display needed).

    mmpt plot runs/demo              # -> runs/demo/plots/loss.png, contrastive.png, lr.png, ...

Figures (one is skipped when none of its keys were logged):
  loss.png         loss and caption_loss, one line per task (tasks alternate: each line is its task's steps)
  contrastive.png  contrastive_loss/<pair> and logit_scale/<pair>, one line per pair
  lr.png           lr
  throughput.png   samples_per_s, one line per task
  moe.png          moe/<modality>/max_load and moe/<modality>/dropped_rate, one line per modality
  eval.png         every eval/... metric, one panel each (they are logged only at eval steps)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mmpt.errors import DataError

Series = tuple[list, list]  # (steps, values)
Panel = tuple[str, dict]  # (title, {line label: Series})


def read_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a run still writing) is left out; any other bad line
    is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (is this a run directory?)")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1 and records:
                break
            raise DataError(f"{path}:{i}: not a JSON record ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DataError(f"{path}:{i}: a record must be a JSON object with an integer 'step'")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records (the run has not logged a step yet)")
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list, key: str, task: str | None = None) -> Series:
    """Steps and values of `key` over the records that have it (only those of `task` if given)."""
    rows = [(r["step"], r[key]) for r in records
            if _number(r.get(key)) and (task is None or r.get("task", "all") == task)]
    return [s for s, _ in rows], [v for _, v in rows]


def by_task(records: list, key: str) -> dict:
    tasks = sorted({r.get("task", "all") for r in records if _number(r.get(key))})
    return {t: series(records, key, t) for t in tasks}


def by_middle(records: list, prefix: str, suffix: str = "") -> dict:
    """{name: Series} for every key `prefix<name>suffix` (a pair, or a modality in moe/<modality>/<metric>)."""
    keys = sorted({k for r in records for k in r if k.startswith(prefix) and k.endswith(suffix)
                   and len(k) > len(prefix) + len(suffix)})
    return {k[len(prefix): len(k) - len(suffix)]: series(records, k) for k in keys}


def figures(records: list) -> dict[str, list[Panel]]:
    """File stem -> its panels, each with at least one line; figures without any are left out."""
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    plan = {
        "loss": [("loss", by_task(records, "loss")), ("caption_loss", by_task(records, "caption_loss"))],
        "contrastive": [("contrastive_loss", by_middle(records, "contrastive_loss/")),
                        ("logit_scale", by_middle(records, "logit_scale/"))],
        "lr": [("lr", {"lr": series(records, "lr")})],
        "throughput": [("samples_per_s", by_task(records, "samples_per_s"))],
        "moe": [(f"moe {metric}", by_middle(records, "moe/", f"/{metric}")) for metric in ("max_load", "dropped_rate")],
        "eval": [(key, {key: series(records, key)}) for key in eval_keys],
    }
    out = {}
    for name, panels in plan.items():
        kept = [(title, {label: s for label, s in lines.items() if s[0]}) for title, lines in panels]
        kept = [(title, lines) for title, lines in kept if lines]
        if kept:
            out[name] = kept
    return out


def draw(panels: list[Panel], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: files only, whatever display the machine has
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):  # spare axes are hidden below
        for label, (steps, values) in lines.items():
            # Sparse series (eval steps) need markers to be visible at all.
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures of RUN/metrics.jsonl into out_dir (default RUN/plots); returns the PNG paths."""
    records = read_records(Path(run_dir) / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, panels in figures(records).items():
        path = out / f"{name}.png"
        draw(panels, path)
        paths.append(path)
    return paths
