"""Benchmarks: `mmpt bench NAME [flags]` prints one JSON object with the named peer measured in the same run.

Each bench is a module of this package that declares its own flags and its work:

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...   # the bench's flags
    def main(args: argparse.Namespace) -> dict: ...                   # the result, one JSON object
    def exit_code(result: dict) -> int: ...                           # optional; 0 when absent

`run_bench` gives every bench `--json` (one line instead of indented) and `--out PATH` (the same JSON written
to a file too), and keeps stdout for the JSON alone: whatever the bench or its libraries print goes to stderr.
Only the names in BENCHES are imported, so a bench's heavy imports cost nothing to the rest of the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from pathlib import Path
from typing import NoReturn

from mmpt.evals import count as count  # the benches' --flag type, one definition

# name on the command line -> one-line summary (the module is mmpt.bench.<name with '-' as '_'>)
BENCHES = {
    "data": "loader samples/s per modality against open_clip's webdataset path and decord",
    "moe": "one MoE layer against a dense FFN of the same active parameters, both backends",
    "loss": "contrastive losses on 2/4/8 gloo processes against open_clip's ClipLoss and SigLipLoss",
    "accumulate": "GradCache accumulation against one pass over the same batch",
    "step": "whole training steps against open_clip's train_one_epoch",
    "parity": "a learning run side by side with open_clip's own trainer, same shards and settings, over seeds",
    "imp-scale": "the imp_* configs at their real widths on a GPU: step time, MFU, memory (--cpu-smoke on CPU)",
}


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line with exit code 2, as for every other mmpt command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def given(args: argparse.Namespace, *names: str) -> dict:
    """The named flags the user set (None: not given), as keyword arguments of a bench's `run`."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def module_of(name: str):
    if name not in BENCHES:
        raise KeyError(f"unknown bench {name!r}: one of {', '.join(BENCHES)}")
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def build_parser(name: str, module) -> argparse.ArgumentParser:
    doc = (module.__doc__ or BENCHES[name]).strip()
    parser = _Parser(prog=f"mmpt bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    parser.add_argument("--out", type=Path, help="write the JSON object to this file too")
    module.add_arguments(parser)
    return parser


def run_bench(name: str, argv: list[str]) -> int:
    """Parse the bench's own flags from argv, run it, print its one JSON object; the exit code."""
    module = module_of(name)
    args = build_parser(name, module).parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # libraries' chatter must not break "one JSON object on stdout"
        result = module.main(args)
    text = json.dumps(result, indent=None if args.json else 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return module.exit_code(result) if hasattr(module, "exit_code") else 0
