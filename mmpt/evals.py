"""The eval registry's core: every eval task mmpt can run, one entry each.

    from mmpt.evals import EVALS
    EVALS["zeroshot"].config        # the dataclass of one item of eval.zeroshot

An entry names the eval (`mmpt eval NAME`, the config list `eval.NAME`, metric keys `eval/NAME/LABEL/...`), the
dataclass of one configured item, and the runner. The built-in evals register in `mmpt.eval` (one file each);
a new one is one `register(Eval(...))` in one file, and the CLI (`mmpt --plugin MODULE eval NAME`), training
(`eval.every`, `plugins: [MODULE]`) and the model card find it here. This module imports no entry: the config
schema (mmpt.config.schema) composes `eval.<name>` from it.

The runner: `run(model, cfg, item, **options) -> result dict`, on every rank of a process group (or alone), the
same dict on every rank. Options: `batch_size` and `workers` (None: eval.batch_size / eval.workers), `out` (the
CLI's --out, where the result JSON goes: side files may go beside it) and the eval's own CLI flags that set no
field of its config; training passes none, so every option needs a default.
"""
from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

# Counts a result may hold beside its metrics: the model card shows the sample count in its own column.
COUNTS = ("num_samples", "skipped")


@dataclass(frozen=True)
class Eval:
    name: str  # lower-case letters, digits and "_": a config key, a CLI subcommand and a metric prefix
    config: type  # dataclass of one item of eval.<name> (and the fields `mmpt eval <name>` sets from its flags)
    run: Callable[..., dict]  # (model, cfg, item, **options) -> result (see the module docstring)
    label: Callable[[Any, Any], str] = lambda cfg, item: ""  # its part of metric keys: eval/NAME/LABEL/metric
    check: Callable[[Any, Any], Optional[str]] = lambda cfg, item: None  # "field=value: problem" in this run, or None
    # At training start (not at the first eval hours in): raise naming a missing data or classes file.
    inputs: Callable[[Any, Any], None] = lambda cfg, item: None
    # fnmatch patterns over the result's numeric key paths ("top*", "*/R@1"): what training logs and the model
    # card lists; (): every number of the result.
    metrics: tuple[str, ...] = ()
    # The model card's (model-index task type, task name), formatted with the result's strings ("{modality}");
    # "" is the eval's name.
    task: tuple[str, str] = ("", "")
    summary: Optional[Callable[[dict], str]] = None  # the line `mmpt eval NAME` prints on stderr (None: metrics)
    # (argparse parser) -> None: adds the eval's own flags. A flag whose dest is a field of `config` sets it; any
    # other goes to `run` as an option. Fields no flag sets get one each, --field-name (None: all of them).
    cli: Optional[Callable[[Any], None]] = None
    help: str = ""  # the line of `mmpt eval --help`
    extra: dict = field(default_factory=dict)  # anything else the eval's own file wants to keep beside it

    def key(self, cfg, item) -> str:
        """The prefix of this item's metric keys in training: eval/NAME/LABEL."""
        label = self.label(cfg, item)
        return f"eval/{self.name}/{label}" if label else f"eval/{self.name}"

    def is_metric(self, path: str) -> bool:
        """Whether the number at a result's key path ("top1", "image_to_text/R@1") is one of its metrics."""
        return not self.metrics or any(fnmatch.fnmatchcase(path, p) for p in self.metrics)

    def values(self, result: dict) -> dict[str, float]:
        """The result's metrics by key path: its numbers matching `metrics`."""
        return {k: v for k, v in numbers(result).items() if self.is_metric(k)}

    def line(self, result: dict) -> str:
        """One line on what a result says, for stderr."""
        if self.summary is not None:
            return self.summary(result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.values(result).items() if k not in COUNTS)
        samples = f" on {result['num_samples']} samples" if "num_samples" in result else ""
        return f"{self.name}{samples}: {shown}"


EVALS: dict[str, Eval] = {}


def register(entry: Eval, replace: bool = False) -> Eval:
    """Add an eval (or, with replace=True, redefine one). Returns the entry."""
    if not entry.name.replace("_", "").isalnum() or entry.name != entry.name.lower():
        raise ValueError(f"eval name {entry.name!r}: use lower-case letters, digits and '_'")
    if entry.name in EVALS and not replace:
        raise ValueError(f"eval '{entry.name}' is registered already (pass replace=True to redefine it)")
    EVALS[entry.name] = entry
    return entry


def get(name: str) -> Eval:
    if name not in EVALS:
        raise KeyError(f"unknown eval '{name}' (known: {', '.join(EVALS)})")
    return EVALS[name]


def numbers(result: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) result dict by key path, nested keys joined with '/'; lists, strings, booleans
    and None are left out."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (--workers -1 would otherwise fail deep in a DataLoader)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be >= {minimum}")
        return value
    return parse
