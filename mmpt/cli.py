"""mmpt command line.

    mmpt train --config demo train.steps=100            (single process)
    torchrun --nproc_per_node=2 -m mmpt.cli train --config demo
    mmpt eval zeroshot --model runs/demo --out runs/demo/zeroshot.json
    mmpt eval retrieval --model runs/demo --pair image-text
    NPROC=2 launchers/torchrun.sh eval zeroshot --model hf-hub:org/name --modality audio --data data/esc50
    mmpt shards build --manifest pairs.jsonl --out data/mine --prefix mine --workers 8
    mmpt shards check data/mine --json
    mmpt model info imp_moe_b16 --json
    mmpt --plugin my_pkg.depth shards check data/depth    (a module registering a modality)
    mmpt export --run runs/demo --out exports/demo --results runs/demo/zeroshot.json
    mmpt push exports/demo --repo org/name
    mmpt plot runs/demo
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from mmpt.bench import BENCHES, run_bench
from mmpt.config import import_plugins, load_config
from mmpt.errors import ConfigError
from mmpt.errors import DataError


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from mmpt.data.tokenizer import check_model_fits
    from mmpt.train.loop import train

    check_model_fits(cfg.data.tokenizer, cfg.model)  # a bad tokenizer is one line before any process group
    train(cfg)
    return 0


@contextlib.contextmanager
def _eval_session(args):
    """The model of --model on its device; under torchrun a process group, so every rank evaluates its split.
    Library chatter goes to stderr: stdout carries only the result JSON."""
    import torch

    from mmpt.distributed import init_distributed, shutdown_distributed
    from mmpt.hub import load_model

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
    from mmpt.distributed import dist_info

    if dist_info()[0] != 0:
        return 0
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    print(line, file=sys.stderr)
    return 0


def cmd_eval_zeroshot(args) -> int:
    from mmpt.eval.zeroshot import run_zeroshot

    png = args.png or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    with _eval_session(args) as (model, cfg):
        result = run_zeroshot(model, cfg, args.modality, data=args.data, classes=args.classes,
                              templates=args.templates, batch_size=args.batch_size, workers=args.workers, png=png)
    return _report(args, result, f"zero-shot top-1 {result['top1']:.3f} (chance {result['chance_top1']:.3f}) "
                                 f"on {result['num_samples']} samples")


def cmd_eval_retrieval(args) -> int:
    from mmpt.eval.retrieval import run_retrieval

    modalities = args.pair.split("-")
    if len(modalities) != 2:
        raise ConfigError(f"--pair {args.pair!r}: expected two modalities joined by '-', e.g. image-text")
    with _eval_session(args) as (model, cfg):
        result = run_retrieval(model, cfg, modalities, args.data or cfg.data.val, batch_size=args.batch_size,
                               workers=args.workers)
    ways = [f"{k.replace('_to_', '->')} R@1 {v['R@1']:.3f}" for k, v in result.items() if isinstance(v, dict)]
    return _report(args, result, f"retrieval {result['pair']} on {result['num_samples']} samples: " + ", ".join(ways))


def cmd_eval_caption(args) -> int:
    from mmpt.eval.caption import run_caption

    with _eval_session(args) as (model, cfg):
        result = run_caption(model, cfg, args.modality, args.data or cfg.data.val, batch_size=args.batch_size,
                             num_beams=args.beams, max_len=args.max_len, workers=args.workers)
    return _report(args, result, f"caption BLEU-4 {result['bleu4']:.3f} CIDEr {result['cider']:.3f} "
                                 f"on {result['num_samples']} samples")


def cmd_shards_build(args) -> int:
    from mmpt.data.build import build_shards, folder_rows
    from mmpt.data.shards import read_manifest

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
    from mmpt.data.check import check_shards, format_report

    report = check_shards(args.spec, args.workers)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["bad_fraction"] > args.max_bad else 0


def cmd_bench(args) -> int:
    return run_bench(args.what, (["--json"] if args.json else []) + args.options)


def cmd_model_info(args) -> int:
    from mmpt.model.info import run_info

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
    from mmpt.export import export

    print(export(args.run, args.out, args.results, trust_plugins=args.trust_plugins))
    return 0


def cmd_push(args) -> int:
    from mmpt.hub import push

    print(push(args.export_dir, args.repo, private=args.private, revision=args.revision))
    return 0


def cmd_plot(args) -> int:
    from mmpt.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line with exit code 2 too, like every other user error (argparse prints its usage
    block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int):
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="mmpt", description="Distributed multimodal pretraining.",
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import a module that registers modalities (mmpt.modality.register); repeatable")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (launch with torchrun for several processes)")
    p.add_argument("--config", required=True, help="shipped config name (demo) or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained model (under torchrun: every rank its split)")
    ev = ev.add_subparsers(dest="eval_command", required=True)
    p = _eval_parser(ev, "zeroshot", "zero-shot classification from text prompts", cmd_eval_zeroshot)
    p.add_argument("--modality", default="image", help="what is classified: any of the model's modalities but text")
    p.add_argument("--data", help="shards, a folder per class, or a CSV/JSONL manifest (default: data.val)")
    p.add_argument("--classes", help="classes JSON: classnames (+ templates); default: data.classes")
    p.add_argument("--templates", help="a shipped template set instead: photo, action, sound or speech")
    p.add_argument("--png", help="confusion matrix PNG (default: beside --out)")
    p = _eval_parser(ev, "retrieval", "R@1/5/10 and median rank in both directions", cmd_eval_retrieval)
    p.add_argument("--pair", default="image-text", help="two modalities of the model, e.g. image-text, video-audio")
    p.add_argument("--data", help="shards of paired samples (default: data.val)")
    p = _eval_parser(ev, "caption", "captions generated for a modality, BLEU-4 and CIDEr", cmd_eval_caption)
    p.add_argument("--modality", default="image")
    p.add_argument("--data", help="shards with captions (default: data.val)")
    p.add_argument("--beams", type=_count(1), default=1, help="1: greedy")
    p.add_argument("--max-len", type=_count(2))

    sh = sub.add_parser("shards", help="build webdataset shards").add_subparsers(dest="shards_command", required=True)
    p = sh.add_parser("build", help="manifest (CSV/JSONL) or folder of media + captions -> tar shards + sizes.json")
    p.add_argument("--manifest", help="CSV or JSONL with image/video/audio/text/label columns")
    p.add_argument("--folder", help="folder layout: files grouped by name (a.jpg + a.txt + a.json)")
    p.add_argument("--labels-from-folders", action="store_true", help="parent folder names become class labels")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--shard-size", type=_count(1), default=1000)
    p.add_argument("--workers", type=_count(0), default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the manifest order")
    p.set_defaults(func=cmd_shards_build)
    p = sh.add_parser("check", help="decode every sample; report bad ones and statistics")
    p.add_argument("spec", help="shard directory, brace pattern or glob")
    p.add_argument("--workers", type=_count(0), default=1)
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
    p.add_argument("config", help="shipped config name (demo, imp_b16, imp_moe_b16, imp_moe_l16) or YAML path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("export", help="run checkpoint -> safetensors + config + tokenizer + model card")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--results", nargs="*", default=[], help="eval JSON files for the model card's metrics")
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


def _eval_parser(ev, name: str, summary: str, func) -> argparse.ArgumentParser:
    p = ev.add_parser(name, help=summary)
    p.add_argument("--model", "--run", dest="model", required=True,
                   help="run dir, export dir, hf-hub:ORG/NAME[@rev] or local-dir:PATH")
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument("--workers", type=_count(0), help="decoding processes (default: eval.workers)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: the GPU when there is one")
    p.add_argument("--trust-plugins", action="store_true",
                   help="import the modules the model's saved config names in `plugins` (code chosen by its files)")
    p.set_defaults(func=func)
    return p


# User errors: a bad config or data, or a path that is missing, unreadable or the wrong kind of file. Anything
# else is a bug in mmpt and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def command_name(args) -> str:
    """`train`, `eval zeroshot`, `shards build`, ...: the words the user typed, as argparse names them too."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_plugins(args.plugin)
        return args.func(args)
    except USER_ERRORS as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, always
        print(f"mmpt {command_name(args)}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
