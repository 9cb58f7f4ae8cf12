"""Exporting and loading trained models: a run's DeepSpeed checkpoint -> model.safetensors + config.yaml +
README.md model card, and `load_pretrained` for either a run or an export directory.

    mmpt export --run runs/demo --out exports/demo
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from mmpt.config import Config, config_from_dict
from mmpt.modality import ordered, pair_name
from mmpt.modality import pairs as modality_pairs
from mmpt.model import build_for_run
from mmpt.train.checkpoint import checkpoint_dir, consolidated_state_dict


def _load_config(path: Path) -> Config:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected the run's resolved config)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def load_pretrained(path: str | Path, tag: str | None = None):
    """(model in eval mode, Config) from a run directory (DeepSpeed checkpoints) or an export directory."""
    path = Path(path)
    cfg = _load_config(path / "config.yaml")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    else:
        state = consolidated_state_dict(checkpoint_dir(path), tag)
    model = build_for_run(cfg)
    missing, unexpected = model.load_state_dict(state, strict=True)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match config.yaml (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), cfg


def render_model_card(cfg: Config, n_params: int, results: dict | None) -> str:
    template = resources.files("mmpt.model_cards").joinpath("default.md").read_text()
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (results or {}).items())
    table = f"| metric | value |\n|---|---|\n{rows}" if rows else "No evaluation results were attached to this export."
    mods = ordered(cfg.model.modalities)
    pairs = ", ".join(pair_name(a, b) for a, b in modality_pairs(mods))
    m = cfg.model
    return template.format(name=cfg.name, pairs=pairs, modalities=", ".join(mods), width=m.width, depth=m.depth,
                           heads=m.heads, embed_dim=m.embed_dim, parameters=f"{n_params:,}", steps=cfg.train.steps,
                           train_data=", ".join(f"{s.name}: {s.shards}" for s in cfg.data.sources), results=table,
                           config=yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip())


def export(run_dir: str | Path, out_dir: str | Path, results_path: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    model, cfg = load_pretrained(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; the tensors here are independent but may be views after loading.
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    results = json.loads(Path(results_path).read_text()) if results_path else None
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(render_model_card(cfg, n_params, results))
    return out
