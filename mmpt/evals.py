"""The eval registry's core: every eval task mmpt can run, one entry each.

    from mmpt.evals import EVALS
    EVALS["zeroshot"].config        # the dataclass of one item of eval.zeroshot

An entry names the eval (`mmpt eval NAME`, the config list `eval.NAME`, metric keys `eval/NAME/...`), the
dataclass of one configured item, and the runner. The built-in evals register in `mmpt.eval` (one file each);
a new one is one `register(Eval(...))` in one file, and the CLI, training (`eval.every`) and the model card find
it here. This module imports no entry: the config schema (mmpt.config.schema) composes `eval.<name>` from it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Eval:
    name: str  # lower-case letters, digits and "_": a config key, a CLI subcommand and a metric prefix
    config: type  # dataclass of one item of eval.<name> (and of `mmpt eval <name>`'s flags)
    # (model, cfg, item, **options) -> {metric: value}: runs on every rank of a process group (or alone)
    run: Callable[..., dict]
    label: Callable[..., str] = lambda cfg, item: ""  # (cfg, item) -> its part of metric keys: eval/NAME/LABEL/m
    check: Callable[..., Optional[str]] = lambda cfg, item: None  # a problem with the item in this run, or None
    metrics: tuple[str, ...] = ()  # metric names a result holds, for the model card
    cli: Optional[Callable[..., Any]] = None  # argparse sub-parser -> None: the eval's own flags (None: none)
    extra: dict = field(default_factory=dict)  # anything else the eval's own file wants to keep beside it


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
