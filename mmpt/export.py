"""Exporting and loading trained models.

    mmpt export --run runs/demo --out exports/demo --results runs/demo/zeroshot.json runs/demo/retrieval.json

An export directory is what `mmpt push` uploads and `mmpt.from_pretrained` loads (mmpt/hub.py):

    model.safetensors    consolidated fp32 weights from any ZeRO stage, native MoE layout
    config.json          the resolved run config (plugins included; model.moe.backend as trained)
    tokenizer.json       which tokenizer: open_clip's BPE (its vocab ships in its wheel) or tokenizer/ (a
                         HuggingFace tokenizer, save_pretrained)
    preprocessing.json   per modality of the model: its decoder and the DecodeSettings settings it is given
    README.md            the model card (model_cards/default.md): metadata, model-index from the eval results

`load_pretrained` reads a run directory (DeepSpeed checkpoints, consolidated) or an export directory. Modules
named in the saved config's `plugins` are imported only with trust_plugins=True (`--trust-plugins`) or when
imported already: a downloaded file must not choose code to run (mmpt.config.import_plugins).
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import yaml

import mmpt.eval  # noqa: F401  (registers the built-in evals, whose results the model card lists)
from mmpt import modality as registry
from mmpt.config import Config, config_from_dict, yaml_problem
from mmpt.data.media import MEAN, STD, DecodeSettings
from mmpt.data.shards import read_json
from mmpt.data.tokenizer import OPENCLIP, Tokenizer, resolve
from mmpt.errors import ConfigError, DataError
from mmpt.evals import COUNTS, EVALS, Eval, numbers
from mmpt.model import build_for_run
from mmpt.model.info import model_info
from mmpt.train.checkpoint import checkpoint_dir
from mmpt.train.consolidate import consolidated_state_dict
from mmpt.train.runlog import read_metrics

WEIGHTS, CONFIG, TOKENIZER, PREPROCESSING, CARD = (
    "model.safetensors", "config.json", "tokenizer.json", "preprocessing.json", "README.md")
HF_TOKENIZER_DIR = "tokenizer"
RUN_CONFIG = "config.yaml"  # a run directory's resolved config (and older exports')


def read_config(path: Path, trust_plugins: bool = False) -> Config:
    """config.json of an export, else config.yaml of a run directory (or of an older export); a bad one is an
    error naming the file. trust_plugins: import the modules its `plugins` names (else only imported ones pass)."""
    if (path / CONFIG).is_file():
        file, data = path / CONFIG, read_json(path / CONFIG, "model config")
    elif (path / RUN_CONFIG).is_file():
        file = path / RUN_CONFIG
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as e:
            raise DataError(f"{file}: invalid YAML: {yaml_problem(e)}") from None
    else:
        raise FileNotFoundError(f"{path}: no {CONFIG} or {RUN_CONFIG} (not an export or run directory)")
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a mapping of config sections, got {type(data).__name__}")
    try:
        return config_from_dict(data, trust_plugins)
    except ConfigError as e:
        raise type(e)(f"{file}: {e}") from None


def native_backend(cfg: Config) -> Config:
    """A copy of the config building the native MoE layer: same parameters as DeepSpeed's in one layout, and
    no process group needed (checkpoints are consolidated to it)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.moe.backend = "native"
    return cfg


def load_pretrained(path: str | Path, tag: str | None = None, trust_plugins: bool = False):
    """(model in eval mode, Config) from a run directory (DeepSpeed checkpoints) or an export directory.
    The model is built with the native MoE backend; the returned Config is the saved one. trust_plugins: see
    read_config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or export directory")
    cfg = read_config(path, trust_plugins)
    if (path / WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / WEIGHTS))  # no pickle: safe for downloaded exports
    else:
        state = consolidated_state_dict(checkpoint_dir(path), tag)
    model = build_for_run(native_backend(cfg))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise DataError(f"{path}: weights do not match the saved config: {first[0].strip()}") from None
    return model.eval(), cfg


# ---- tokenizer and preprocessing ---------------------------------------------------------------------------

def write_tokenizer(cfg: Config, out: Path) -> dict:
    """tokenizer.json (+ tokenizer/ for a HuggingFace tokenizer directory); returns what tokenizer.json says."""
    tok = Tokenizer(cfg.data.tokenizer, cfg.model.context_length)
    info = {"kind": OPENCLIP, "context_length": cfg.model.context_length, "sot_id": tok.sot_id,
            "eot_id": tok.eot_id, "vocab_size": tok.vocab_size}
    if cfg.data.tokenizer != OPENCLIP:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(resolve(cfg.data.tokenizer), local_files_only=True).save_pretrained(
            str(out / HF_TOKENIZER_DIR))
        info.update(kind="huggingface", path=HF_TOKENIZER_DIR)
    (out / TOKENIZER).write_text(json.dumps(info, indent=1) + "\n")
    return info


def preprocessing(cfg: Config, tokenizer: str) -> dict:
    """Per modality: the registry decoder and the DecodeSettings it is given (eval mode).

    A setting named after a modality (data.video, data.audio) is that modality's own section, so it is listed
    under it alone; the others (image_size, context_length, tokenizer) under every modality.
    `tokenizer` is "openclip" or a directory relative to the export. Training augmentation is left out."""
    given = {**DecodeSettings.from_config(cfg).to_dict(), "tokenizer": tokenizer}
    del given["augment"]
    entries = {}
    for name in registry.ordered(cfg.model.modalities):
        entry = registry.get(name)
        settings = {k: v for k, v in given.items() if k not in registry.MODALITIES or k == name}
        entries[name] = {"decoder": getattr(entry.decode, "__name__", str(entry.decode)),
                         "extensions": list(entry.extensions), "settings": settings}
    # CLIP's normalisation of decoded pixels (images and video frames), for tools that decode themselves.
    return {"modalities": entries, "pixel_mean": list(MEAN), "pixel_std": list(STD)}


# ---- model card --------------------------------------------------------------------------------------------

class _Blank(dict):
    def __missing__(self, key):
        return ""


def result_eval(stem: str, result: dict) -> Eval | None:
    """The registered eval a result came from: its "eval" key (`mmpt eval` writes it), else the eval that starts
    the file's name (zeroshot_audio.json), else the one whose metric patterns its numbers match; None if none."""
    if result.get("eval") in EVALS:
        return EVALS[result["eval"]]
    named = [e for name, e in EVALS.items() if stem == name or stem.startswith((f"{name}_", f"{name}-"))]
    if named:
        return named[0]
    keys = [k for k in numbers(result) if k not in COUNTS]
    return next((e for e in EVALS.values() if e.metrics and any(e.is_metric(k) for k in keys)), None)


def _dataset(data: str) -> str:
    """Eval data as a short name: its last two path parts (data/demo/val -> demo/val)."""
    return "/".join(Path(data).parts[-2:]) if data else "unknown"


def eval_rows(results: list[tuple[str, dict]]) -> list[dict]:
    """(file stem, result) -> one row per metric (the eval's entry says which numbers are metrics; counts are the
    samples column): task type and name, dataset, samples, metric, value."""
    rows = []
    for stem, result in results:
        entry = result_eval(stem, result)
        fill = _Blank({k: v for k, v in result.items() if isinstance(v, str)})
        kind = entry.task if entry is not None else ("", "")
        name = entry.name if entry is not None else stem
        task_type, task = ((kind[0] or name).format_map(fill).strip("-"), (kind[1] or name).format_map(fill).strip())
        values = entry.values(result) if entry is not None else numbers(result)
        dataset = _dataset(str(result.get("data") or result.get("dataset") or ""))
        for metric, value in values.items():
            if metric not in COUNTS:
                rows.append({"task_type": task_type, "task": task, "dataset": dataset, "metric": metric,
                             "value": value, "samples": result.get("num_samples", "")})
    return rows


def _model_index(name: str, rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["task_type"], r["task"], r["dataset"]), []).append(
            {"type": r["metric"], "name": r["metric"], "value": r["value"]})
    results = [{"task": {"type": t, "name": n}, "dataset": {"type": d, "name": d}, "metrics": m}
               for (t, n, d), m in groups.items()]
    return [{"name": name, "results": results}]


def card_metadata(cfg: Config, rows: list[dict]) -> dict:
    moe = cfg.model.moe.num_experts > 1
    tags = ["multimodal", "contrastive", *(["mixture-of-experts"] if moe else []),
            *registry.ordered(cfg.model.modalities), "mmpt"]
    meta = {"license": "apache-2.0", "library_name": "mmpt", "tags": tags,
            "datasets": list(dict.fromkeys(s.name for s in cfg.data.sources))}
    if rows:
        meta["model-index"] = _model_index(cfg.name, rows)
    return meta


def _results_table(rows: list[dict]) -> str:
    if not rows:
        return "No evaluation results were attached to this export."
    lines = ["| task | dataset | samples | metric | value |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['dataset']} | {r['samples']} | {r['metric']} | {r['value']:.4f} |" for r in rows]
    return "\n".join(lines)


def _architecture(cfg: Config, info: dict) -> dict:
    m, moe = cfg.model, cfg.model.moe
    layers = info["moe_layers"]
    experts = (f"{moe.num_experts} experts in {len(layers)} of {m.depth} layers ({', '.join(map(str, layers))}); "
               f"{moe.router} routing, top-{moe.top_k}, capacity factor {moe.capacity_factor} (trained with the "
               f"{moe.backend} backend)") if moe.num_experts > 1 else "none (dense trunk)"
    per_modality = "\n".join(f"| {name} | {info['tokens_per_sample'][name]} | {info['gflops_per_sample'][name]:.3f} |"
                             for name in registry.ordered(m.modalities))
    return {"width": m.width, "depth": m.depth, "heads": m.heads, "embed_dim": m.embed_dim, "patch": m.patch_size,
            "image_size": m.image_size, "experts": experts, "decoder": f"{m.decoder_layers} causal text + "
            f"{m.decoder_cross_layers} cross-attention layers", "per_modality": per_modality,
            "parameters": f"{info['parameters']:,}", "active": f"{info['active_parameters_per_token']:,}"}


def is_eval_metric(key: str) -> bool:
    """A metrics.jsonl key holding an eval's metric (eval/...), not its sample counts."""
    return key.startswith("eval/") and key.rsplit("/", 1)[-1] not in COUNTS


def _shown(key: str) -> bool:
    """A card's progress rows: losses and eval metrics."""
    return key == "loss" or key.endswith("/loss") or is_eval_metric(key)


def training_progress(records: list[dict]) -> str:
    """A card section from a run's metrics.jsonl records: the step reached, the last logged losses and the latest
    value of every eval metric logged during training ("" when nothing was logged)."""
    if not records:
        return ""
    step = max(int(r.get("step", 0)) for r in records)
    latest: dict = {}
    for record in records:
        latest.update({k: (record["step"], v) for k, v in record.items() if isinstance(v, (int, float)) and _shown(k)})
    rows = "\n".join(f"| {k} | {v:.4g} | {s} |" for k, (s, v) in sorted(latest.items()))
    return (f"\n### Progress\nTrained to step {step} of {{steps}} so far.\n\n| metric | value | at step |\n"
            f"|---|---|---|\n{rows}\n")


def render_model_card(cfg: Config, results: list[tuple[str, dict]] | None = None, progress: str = "") -> str:
    """README.md from model_cards/default.md. results: (file stem, eval result dict) pairs; progress: a section
    from training_progress."""
    rows = eval_rows(results or [])
    template = resources.files("mmpt.model_cards").joinpath("default.md").read_text()
    mods = registry.ordered(cfg.model.modalities)
    sources = "\n".join(f"- {s.name} ({registry.pair_name(*s.modalities)}, weight {s.weight}): `{s.shards}`"
                        for s in cfg.data.sources)
    return template.format(
        metadata=yaml.safe_dump(card_metadata(cfg, rows), sort_keys=False).strip(), name=cfg.name,
        pairs=", ".join(dict.fromkeys(registry.pair_name(*s.modalities) for s in cfg.data.sources)),
        modalities=", ".join(mods),
        first=next((x for x in mods if x != registry.TEXT), mods[0]), steps=cfg.train.steps, sources=sources,
        progress=progress.replace("{steps}", str(cfg.train.steps)),
        results=_results_table(rows), config=yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(),
        **_architecture(cfg, model_info(cfg)))


def load_results(paths: list[str | Path]) -> list[tuple[str, dict]]:
    out = []
    for p in map(Path, paths):
        data = read_json(p, "results file")
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(x, dict) for x in items):
            raise DataError(f"{p}: expected an eval result object (or a list of them)")
        out += [(p.stem, x) for x in items]
    return out


# ---- export ------------------------------------------------------------------------------------------------

def export(run_dir: str | Path, out_dir: str | Path, results: list[str | Path] | str | Path | None = None,
           trust_plugins: bool = False, progress: bool = False) -> Path:
    """A run (or export) directory -> an export directory (see the module docstring). results: eval JSON files
    whose metrics go into the model card. trust_plugins: import the modules the run's config names. progress: the
    card gets the run's metrics.jsonl so far (losses, evals during training)."""
    from safetensors.torch import save_file

    paths = [results] if isinstance(results, (str, Path)) else list(results or [])
    loaded = load_results(paths)  # before any work: a wrong path is one line
    model, cfg = load_pretrained(run_dir, trust_plugins=trust_plugins)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage (the caption decoder's tied LM head): save independent copies.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "library": "mmpt"})
    (out / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    info = write_tokenizer(cfg, out)
    prep = preprocessing(cfg, info.get("path", OPENCLIP))
    (out / PREPROCESSING).write_text(json.dumps(prep, indent=1) + "\n")
    section = training_progress(read_metrics(run_dir)) if progress else ""
    (out / CARD).write_text(render_model_card(cfg, loaded, section))
    return out
