"""Zero-shot classification: class prompts -> text embeddings -> nearest class for each held-out sample.

    mmpt eval zeroshot --run runs/demo --out runs/demo/zeroshot.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmpt import modality as registry
from mmpt.data.media import DecodeSpec
from mmpt.data.shards import DataError
from mmpt.data.stream import eval_loader
from mmpt.data.tokenizer import tokenize


def load_classes(path: str | Path, modality: str) -> tuple[list, list]:
    """Class names and prompt templates; without `templates` the modality's defaults from the registry."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"classes file {p}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"classes file {p}: invalid JSON: {e}") from None
    data.setdefault("templates", list(registry.get(modality).templates))
    for key in ("classnames", "templates"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DataError(f"classes file {p}: '{key}' must be a non-empty list")
    return data["classnames"], data["templates"]


@torch.no_grad()
def class_embeddings(model, classnames: list, templates: list, context_length: int,
                     tokenizer: str = "openclip") -> torch.Tensor:
    """(C, E): per class, the normalised mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    prompts = [t.format(c) for c in classnames for t in templates]
    device = next(model.parameters()).device
    emb = model.encode(registry.TEXT, tokenize(prompts, context_length, tokenizer).to(device))["emb"]
    emb = emb.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def zeroshot_classify(model, classifier: torch.Tensor, loader, modality: str = "image",
                      top_k: tuple = (1, 5)) -> dict:
    correct = {k: 0 for k in top_k}
    n, skipped = 0, 0
    for batch in tqdm(loader, desc="zero-shot", leave=False):
        skipped += sum(batch["_skipped"]["reasons"].values())
        labels = batch["label"]
        if (labels < 0).any():
            raise DataError("zero-shot eval needs a label in every sample's json")
        param = next(model.parameters())
        emb = model.encode(modality, batch[modality].to(param.device, param.dtype))["emb"]
        labels = labels.to(param.device)
        # top-k of fewer classes than k: every class is in it (k clipped, the key keeps the asked k)
        ranked = (emb @ classifier.t()).topk(min(max(top_k), classifier.size(0)), dim=-1).indices
        for k in top_k:
            correct[k] += (ranked[:, :k] == labels[:, None]).any(dim=1).sum().item()
        n += labels.numel()
    if n == 0:
        raise DataError("zero-shot eval saw no samples")
    result = {f"top{k}": correct[k] / n for k in top_k}
    result.update(num_samples=n, num_classes=classifier.size(0), chance_top1=1.0 / classifier.size(0),
                  skipped=skipped)
    return result


def run_zeroshot(model, cfg, data_spec: str, classes_path: str, batch_size: int, modality: str = "image") -> dict:
    """Zero-shot classification of `modality` samples (labels in each sample's json) against text prompts."""
    others = [m for m in cfg.model.modalities if m != registry.TEXT]
    if modality not in others or registry.TEXT not in cfg.model.modalities:
        raise DataError(f"--modality {modality}: zero-shot needs text and one of the model's modalities "
                        f"{', '.join(others)}")
    model.eval()
    classnames, templates = load_classes(classes_path, modality)
    classifier = class_embeddings(model, classnames, templates, cfg.model.context_length, cfg.data.tokenizer)
    loader = eval_loader(data_spec, [modality], DecodeSpec.from_config(cfg), batch_size)
    result = zeroshot_classify(model, classifier, loader, modality, top_k=tuple(cfg.eval.top_k))
    result.update(data=data_spec, modality=modality, templates=len(templates))
    return result
