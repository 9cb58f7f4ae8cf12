"""mmpt command line.

    mmpt train --config demo train.steps=100            (single process)
    torchrun --nproc_per_node=2 -m mmpt.cli train --config demo
    mmpt eval zeroshot --model runs/demo --out runs/demo/zeroshot.json
    mmpt eval retrieval --model runs/demo --pair image-text
    mmpt eval caption --model runs/demo --data data/demo/val --out runs/demo/caption.json
    NPROC=2 launchers/torchrun.sh eval zeroshot --model hf-hub:org/name --modality audio --data data/esc50
    mmpt shards build --manifest pairs.jsonl --out data/mine --prefix mine --workers 8
    mmpt shards check data/mine --json
    mmpt model info imp_moe_b16 --json
    mmpt --plugin my_pkg.depth shards check data/depth    (a module registering a modality)
    mmpt --plugin my_pkg.evals eval mine --model runs/demo   (a module registering an eval: mmpt.evals)
    mmpt export --run runs/demo --out exports/demo --results runs/demo/zeroshot.json
    mmpt push exports/demo --repo org/name
    mmpt plot runs/demo
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import NoReturn

import torch
import yaml

import mmpt.eval  # noqa: F401  (registers the built-in evals: `mmpt eval NAME` for each)
from mmpt.bench import BENCHES, run_bench
from mmpt.config import import_plugins, load_config
from mmpt.data.build import build_shards, folder_rows
from mmpt.data.check import check_shards, format_report
from mmpt.data.shards import read_manifest
from mmpt.data.tokenizer import check_model_fits
from mmpt.distributed import dist_info, init_distributed, shutdown_distributed
from mmpt.errors import ConfigError, DataError
from mmpt.evals import EVALS, Eval, count
from mmpt.export import export
from mmpt.hub import load_model, push
from mmpt.model.info import run_info
from mmpt.plot import plot_run
from mmpt.train.loop import train


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_model_fits(cfg.data.tokenizer, cfg.model)  # a bad tokenizer is one line before any process group
    result = train(cfg)
    # Trained and saved, but the Hub lacks the last push: exit 3, except under torchrun, where a non-zero worker
    # means a crash (restarts, an error report) and the launchers read RUN/hub_incomplete instead.
    return 0 if result.get("hub_ok", True) or "TORCHELASTIC_RUN_ID" in os.environ else 3


@contextlib.contextmanager
def _eval_session(args):
    """The model of --model on its device; under torchrun a process group, so every rank evaluates its split.
    Library chatter goes to stderr: stdout carries only the result JSON."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        init_distributed()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model, cfg = load_model(args.model, trust_plugins=args.trust_plugins)
            if args.device != "cpu" and torch.cuda.is_available():
                model = model.to("cuda")
            yield model, cfg
    finally:
        if distributed:
            shutdown_distributed()


def _report(args, result: dict, line: str) -> int:
    if dist_info()[0] != 0:
        return 0
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(line, file=sys.stderr)
    return 0


def eval_request(args) -> tuple[Eval, object, dict]:
    """`mmpt eval NAME ...` -> the entry, its config item (from the flags that set its fields; the others keep
    their defaults) and the run's options from its other flags."""
    entry = EVALS[args.eval_command]
    fields = {f.name for f in dataclasses.fields(entry.config)}
    item = entry.config(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    return entry, item, {k: getattr(args, k) for k in args.eval_flags if k not in fields}


def cmd_eval(args) -> int:
    """`mmpt eval NAME`: the registered eval NAME on the model of --model, its result JSON on stdout (and --out)."""
    entry, item, options = eval_request(args)
    with _eval_session(args) as (model, cfg):
        result = entry.run(model, cfg, item, batch_size=args.batch_size, workers=args.workers, out=args.out,
                           **options)
    result.setdefault("eval", entry.name)  # the model card tells result files apart by it
    return _report(args, result, entry.line(result))


def cmd_shards_build(args) -> int:
    if bool(args.manifest) == bool(args.folder):
        raise DataError("give exactly one of --manifest or --folder")
    rows = list(read_manifest(args.manifest)) if args.manifest else folder_rows(args.folder, args.labels_from_folders)
    base = Path(args.manifest).parent if args.manifest else Path(".")
    summary = build_shards(rows, base, args.out, args.prefix, args.shard_size, args.workers,
                           None if args.no_shuffle else args.seed)
    print(json.dumps(summary, indent=1))
    print(f"wrote {summary['written']} samples in {summary['shards']} shards to {args.out}; refused "
          f"{sum(summary['refused'].values())} {summary['refused'] or ''}", file=sys.stderr)
    return 0 if summary["written"] else 1


def cmd_shards_check(args) -> int:
    report = check_shards(args.shards, args.workers)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["bad_fraction"] > args.max_bad else 0


def cmd_bench(args) -> int:
    return run_bench(args.what, (["--json"] if args.json else []) + args.options)


def cmd_model_info(args) -> int:
    info = run_info(load_config(args.config))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['name']}: {info['parameters']:,} parameters ({info['encoder_parameters']:,} encoder + heads, "
          f"{info['decoder_parameters']:,} caption decoder); {info['active_parameters_per_token']:,} active per token")
    print(f"MoE layers {info['moe_layers'] or 'none'} with {info['experts']} experts")
    for m, g in info["gflops_per_sample"].items():
        print(f"  {m:6s} {info['tokens_per_sample'][m]:5d} tokens  {g:8.2f} GFLOPs/sample (encoder forward)")
    mem = info["loader_memory"]
    print(f"loader shared memory per rank: {mem['in_flight_bytes_per_rank'] / 2**20:,.1f} MiB in flight "
          f"({mem['batches_in_flight_per_task']} batches per task; float32 media: "
          f"{mem['float32_in_flight_bytes_per_rank'] / 2**20:,.1f} MiB)")
    for name, t in mem["tasks"].items():
        print(f"  {name:12s} batch {t['batch_size']:4d}  {t['batch_bytes'] / 2**20:9,.1f} MiB per batch "
              f"(float32 media {t['float32_batch_bytes'] / 2**20:,.1f} MiB)")
    return 0


def cmd_export(args) -> int:
    print(export(args.run, args.out, args.results, trust_plugins=args.trust_plugins, progress=args.progress))
    return 0


def cmd_push(args) -> int:
    print(push(args.export_dir, args.repo, private=args.private, revision=args.revision))
    return 0


def cmd_plot(args) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line with exit code 2 too, like every other user error (argparse prints its usage
    block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mmpt", description="Distributed multimodal pretraining.",
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import a module that registers modalities or evals (mmpt.modality / mmpt.evals); repeatable")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (launch with torchrun for several processes)")
    p.add_argument("--config", required=True, help="shipped config name (demo) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained model (under torchrun: every rank its split)")
    ev = ev.add_subparsers(dest="eval_command", required=True)
    for entry in EVALS.values():
        _eval_parser(ev, entry)

    sh = sub.add_parser("shards", help="build webdataset shards").add_subparsers(dest="shards_command", required=True)
    p = sh.add_parser("build", help="manifest (CSV/JSONL) or folder of media + captions -> tar shards + sizes.json")
    p.add_argument("--manifest", help="CSV or JSONL with image/video/audio/text/label columns")
    p.add_argument("--folder", help="folder layout: files grouped by name (a.jpg + a.txt + a.json)")
    p.add_argument("--labels-from-folders", action="store_true", help="parent folder names become class labels")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--shard-size", type=count(1), default=1000)
    p.add_argument("--workers", type=count(0), default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the manifest order")
    p.set_defaults(func=cmd_shards_build)
    p = sh.add_parser("check", help="decode every sample; report bad ones and statistics")
    p.add_argument("shards", help="shard directory, brace pattern or glob")
    p.add_argument("--workers", type=count(0), default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--max-bad", type=float, default=0.0, help="bad fraction above which the exit code is 1")
    p.set_defaults(func=cmd_shards_check)

    p = sub.add_parser("bench", help="benchmarks; each prints one JSON object with its peer measured in the same run")
    p.add_argument("what", choices=list(BENCHES), help="; ".join(f"{k}: {v}" for k, v in BENCHES.items()))
    p.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the bench's own flags (mmpt bench NAME --help)")
    p.set_defaults(func=cmd_bench)

    md = sub.add_parser("model", help="model accounting").add_subparsers(dest="model_command", required=True)
    p = md.add_parser("info", help="parameters (total, active per token) and FLOPs per sample per modality")
    p.add_argument("config", help="shipped config name (demo, photos, imp_b16, imp_moe_b16, imp_moe_l16) or YAML path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("export", help="run checkpoint -> safetensors + config + tokenizer + model card")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--results", nargs="*", default=[], help="eval JSON files for the model card's metrics")
    p.add_argument("--progress", action="store_true",
                   help="add the run's training progress (RUN/metrics.jsonl: losses, evals so far) to the model card")
    p.add_argument("--trust-plugins", action="store_true",
                   help="import the modules the model's saved config names in `plugins` (code chosen by its files)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload an export directory to the HuggingFace Hub (token: HF login/HF_TOKEN)")
    p.add_argument("export_dir")
    p.add_argument("--repo", required=True, help="ORG/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("plot", help="PNG curves of a run from its metrics.jsonl")
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for the PNGs (default: RUN/plots)")
    p.set_defaults(func=cmd_plot)
    return ap


def _eval_parser(ev, entry: Eval) -> argparse.ArgumentParser:
    """`mmpt eval NAME`: the flags every eval takes, the entry's own (its `cli` hook), then a --field-name flag
    for each field of its config that no flag sets."""
    p = ev.add_parser(entry.name, help=entry.help or f"{entry.name} (registered by {entry.run.__module__})")
    p.add_argument("--model", "--run", dest="model", required=True,
                   help="run dir, export dir, hf-hub:ORG/NAME[@rev] or local-dir:PATH")
    p.add_argument("--batch-size", type=count(1))
    p.add_argument("--workers", type=count(0), help="decoding processes (default: eval.workers)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: the GPU when there is one")
    p.add_argument("--trust-plugins", action="store_true",
                   help="import the modules the model's saved config names in `plugins` (code chosen by its files)")
    common = {a.dest for a in p._actions}  # argparse keeps no public list of a parser's flags
    if entry.cli is not None:
        entry.cli(p)
    hints = typing.get_type_hints(entry.config)
    for f in dataclasses.fields(entry.config):
        if f.name not in {a.dest for a in p._actions}:
            _field_flag(p, f.name, hints[f.name])
    p.set_defaults(func=cmd_eval, eval_flags=sorted({a.dest for a in p._actions} - common))
    return p


def _field_flag(p, name: str, tp) -> None:
    """--name for a config field: its type parses the value (a list takes several); None keeps the default."""
    flag = "--" + name.replace("_", "-")
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if tp is bool:
        p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction)
    elif tp in (int, float, str):
        p.add_argument(flag, dest=name, type=tp)
    elif typing.get_origin(tp) is list and typing.get_args(tp) and typing.get_args(tp)[0] in (int, float, str):
        p.add_argument(flag, dest=name, type=typing.get_args(tp)[0], nargs="+")
    else:
        p.add_argument(flag, dest=name, type=yaml.safe_load, help="a YAML value")


# User errors: a bad config or data, or a path that is missing, unreadable or the wrong kind of file. Anything
# else is a bug in mmpt and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def command_name(args) -> str:
    """`train`, `eval zeroshot`, `shards build`, ...: the words the user typed, as argparse names them too."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, parsed after importing its --plugin modules: the evals they register are `mmpt eval`
    subcommands too."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    pre = _Parser(prog="mmpt", add_help=False, allow_abbrev=False)  # --plugin alone, wherever it stands
    pre.add_argument("--plugin", action="append", default=[])
    import_plugins(pre.parse_known_args(argv)[0].plugin)
    return build_parser().parse_args(argv)


def _user_error(command: str, error: Exception) -> int:
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line, always
    print(f"{command}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except USER_ERRORS as e:  # a --plugin module that cannot be imported
        return _user_error("mmpt", e)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        return _user_error(f"mmpt {command_name(args)}", e)


if __name__ == "__main__":
    sys.exit(main())
