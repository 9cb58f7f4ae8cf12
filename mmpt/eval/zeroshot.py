"""Zero-shot classification: class prompts -> text embeddings -> nearest class for each held-out sample.

    mmpt eval zeroshot --model runs/demo --out runs/demo/zeroshot.json
    result = run_zeroshot(model, cfg, "audio", data="data/esc50.csv", classes="esc50.json", templates="sound")

Data are shards, a folder per class or a manifest (`mmpt.eval.data`). Prompts: a shipped set named by
`templates` (`mmpt.eval.templates`), else the classes file's `templates`, else the modality's registry
defaults; each class is the normalised mean of its prompts' embeddings (CLIP's prompt ensembling).

Under torch.distributed every rank scores its split and the per-class counts and the confusion matrix are
summed with all_reduce, so the result equals one process's exactly. Eval MoE routing is per token and
dropless (`mmpt.model.routing`), so nothing depends on the batch size or on which samples share a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt import modality as registry
from mmpt.data.shards import read_json
from mmpt.data.tokenizer import tokenize
from mmpt.distributed import collective_device, dist_info
from mmpt.errors import DataError
from mmpt.eval.data import Classes, check_model, eval_batches, model_inputs, progress, require_data, skipped_count
from mmpt.eval.templates import template_set
from mmpt.evals import Eval, register


def load_classes(path: str | Path, modality: str, templates: str | None = None) -> tuple[list, list]:
    """Class names and prompt templates: the shipped set `templates`, else the file's, else the registry's."""
    p = Path(path)
    data = read_json(p, "classes file")
    if not isinstance(data, dict):
        raise DataError(f"classes file {p}: expected an object with 'classnames' (and optionally 'templates')")
    if templates is not None:
        data["templates"] = template_set(templates)
    data.setdefault("templates", list(registry.get(modality).templates))
    for key in ("classnames", "templates"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DataError(f"classes file {p}: '{key}' must be a non-empty list")
    return [str(c) for c in data["classnames"]], data["templates"]


@torch.no_grad()
def class_embeddings(model, classnames: list, templates: list, context_length: int,
                     tokenizer: str = "openclip", batch_size: int = 256) -> torch.Tensor:
    """(C, E): per class, the normalised mean of its prompts' embeddings, prompts encoded batch_size at a time."""
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenize(prompts, context_length, tokenizer).to(next(model.parameters()).device)
    emb = torch.cat([model.encode(registry.TEXT, chunk)["emb"].float()
                     for chunk in tokens.split(max(1, batch_size))])
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)


class Counts:
    """Per-class top-k hits, the confusion matrix (rows = true class, top-1 columns) and bad-input tallies,
    kept as one int64 tensor so one all_reduce sums them over ranks."""

    def __init__(self, num_classes: int, top_k: tuple):
        self.c, self.top_k = num_classes, top_k
        self.data = torch.zeros(len(top_k) * num_classes + num_classes ** 2 + 3, dtype=torch.long)
        self.example = None  # a key of an unlabelled or out-of-range sample seen on this rank

    @property
    def hits(self) -> torch.Tensor:  # (K, C)
        return self.data[:len(self.top_k) * self.c].view(len(self.top_k), self.c)

    @property
    def confusion(self) -> torch.Tensor:  # (C, C)
        start = len(self.top_k) * self.c
        return self.data[start:start + self.c ** 2].view(self.c, self.c)

    @property
    def tallies(self) -> torch.Tensor:  # (3,): skipped, unlabelled, label out of range
        return self.data[-3:]

    def add(self, scores: torch.Tensor, labels: torch.Tensor, keys: list) -> None:
        bad = (labels < 0) | (labels >= self.c)
        if bad.any() and self.example is None:
            self.example = keys[int(bad.nonzero()[0, 0])]
        self.tallies[1] += int((labels < 0).sum())
        self.tallies[2] += int((labels >= self.c).sum())
        scores, labels = scores[~bad], labels[~bad]
        # top-k of fewer classes than k: every class is in it (k clipped, the key keeps the asked k)
        ranked = scores.topk(min(max(self.top_k), self.c), dim=-1).indices
        for i, k in enumerate(self.top_k):
            hit = (ranked[:, :k] == labels[:, None]).any(dim=1)
            self.hits[i] += torch.bincount(labels[hit], minlength=self.c)
        self.confusion.view(-1).add_(torch.bincount(labels * self.c + ranked[:, 0], minlength=self.c ** 2))

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            total = self.data.to(collective_device())
            dist.all_reduce(total)
            self.data.copy_(total.cpu())


@torch.no_grad()
def zeroshot_counts(model, classifier: torch.Tensor, batches, modality: str, top_k: tuple) -> Counts:
    """This rank's counts over its batches (scores on the model's device, counting on the CPU)."""
    counts = Counts(classifier.size(0), top_k)
    for batch in progress(batches, f"zero-shot {modality}"):
        counts.tallies[0] += skipped_count(batch)
        if not batch["__key__"]:
            continue
        emb = model.encode(modality, model_inputs(model, batch, modality))["emb"].float()
        counts.add((emb @ classifier.t()).cpu(), batch["label"].cpu(), batch["__key__"])
    return counts


def summarize(counts: Counts, classnames: list, data: str) -> dict:
    """The result dict from summed counts; unlabelled or out-of-range samples and an empty set are errors."""
    skipped, unlabelled, out_of_range = counts.tallies.tolist()
    example = f" (e.g. key {counts.example})" if counts.example else ""
    if unlabelled:
        raise DataError(f"zero-shot {data}: {unlabelled} sample(s) without a label{example}; every sample needs "
                        "`label` (its json, or the manifest's label column)")
    if out_of_range:
        raise DataError(f"zero-shot {data}: {out_of_range} sample(s) with a label outside 0..{len(classnames) - 1} "
                        f"(the classes file has {len(classnames)} classnames){example}")
    confusion = counts.confusion
    per_class = confusion.sum(1)
    n = int(per_class.sum())
    if n == 0:
        raise DataError(f"zero-shot {data}: no samples to evaluate (an empty eval set; {skipped} skipped)")
    result = {f"top{k}": int(counts.hits[i].sum()) / n for i, k in enumerate(counts.top_k)}
    # A class without samples has no accuracy: null in the JSON.
    result["per_class_accuracy"] = {name: (int(confusion[c, c]) / int(per_class[c]) if per_class[c] else None)
                                    for c, name in enumerate(classnames)}
    result.update(confusion=confusion.tolist(), num_samples=n, num_classes=len(classnames),
                  chance_top1=1.0 / len(classnames), skipped=skipped)
    return result


def plot_confusion(confusion: list, classnames: list, path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a PNG (rows = true class); matplotlib's Agg canvas, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(classnames)
    side = min(24.0, 3.0 + 0.35 * c)
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="samples")
    ticks = range(c)
    ax.set_xticks(ticks, classnames, rotation=90, fontsize=max(4, 10 - c // 20))
    ax.set_yticks(ticks, classnames, fontsize=max(4, 10 - c // 20))
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if c <= 20:  # counts readable in the cells
        peak = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def run_zeroshot(model, cfg, modality: str, data: str | None = None, classes: str | None = None,
                 templates: str | None = None, batch_size: int | None = None, workers: int | None = None,
                 png: str | Path | None = None) -> dict:
    """Zero-shot classification of `modality` samples against text prompts (see the module docstring).
    Defaults: cfg.data.val, cfg.data.classes, cfg.eval.batch_size, cfg.eval.workers. Every rank returns the
    same dict; rank 0 writes `png`."""
    data, classes = data or cfg.data.val, classes or cfg.data.classes
    batch_size = batch_size or cfg.eval.batch_size
    workers = cfg.eval.workers if workers is None else workers
    if modality == registry.TEXT:
        raise DataError("zero-shot classifies a non-text modality against text prompts; got modality text")
    check_model(model, cfg, [modality, registry.TEXT], "zero-shot")
    classnames, prompts = load_classes(classes, modality, templates)
    was_training = model.training
    model.eval()
    try:
        classifier = class_embeddings(model, classnames, prompts, cfg.model.context_length, cfg.data.tokenizer,
                                      batch_size)
        batches = eval_batches(data, [modality], cfg, batch_size, workers, labels=True,
                               classes=Classes(classnames, str(classes)))
        counts = zeroshot_counts(model, classifier, batches, modality, tuple(cfg.eval.top_k))
    finally:
        model.train(was_training)
    counts.all_reduce()
    result = summarize(counts, classnames, data)
    result.update(data=data, modality=modality, templates=len(prompts))
    if png is not None and dist_info()[0] == 0:
        plot_confusion(result["confusion"], classnames, png, f"zero-shot {modality}: {Path(str(data)).name} "
                       f"(top-1 {result['top1']:.3f})")
    return result


@dataclass
class ZeroShotEval:
    """One zero-shot classification eval (eval.zeroshot[i]; `mmpt eval zeroshot`)."""
    modality: str = "image"
    data: Optional[str] = None  # shards, a folder per class, or a CSV/JSONL manifest with labels; None: data.val
    classes: Optional[str] = None  # {"classnames": [...], "templates": [...] (optional)}; None: data.classes
    templates: Optional[str] = None  # a shipped template set (photo, action, sound, speech) over the file's


def _check(cfg, item: ZeroShotEval) -> Optional[str]:
    mods = cfg.model.modalities
    if item.modality not in mods or item.modality == registry.TEXT or registry.TEXT not in mods:
        return f"modality={item.modality!r}: needs text and a non-text modality of model.modalities={mods}"
    return None


def _inputs(cfg, item: ZeroShotEval) -> None:
    load_classes(item.classes or cfg.data.classes, item.modality, item.templates)
    require_data(item.data or cfg.data.val)


def _run(model, cfg, item: ZeroShotEval, out: str | None = None, png: str | None = None, **options) -> dict:
    """png: the confusion matrix (the CLI's default: beside --out)."""
    png = png or (str(Path(out).with_suffix(".png")) if out else None)
    return run_zeroshot(model, cfg, item.modality, data=item.data, classes=item.classes, templates=item.templates,
                        png=png, **options)


def _flags(p) -> None:
    p.add_argument("--modality", default="image", help="what is classified: any of the model's modalities but text")
    p.add_argument("--data", help="shards, a folder per class, or a CSV/JSONL manifest (default: data.val)")
    p.add_argument("--classes", help="classes JSON: classnames (+ templates); default: data.classes")
    p.add_argument("--templates", help="a shipped template set instead: photo, action, sound or speech")
    p.add_argument("--png", help="confusion matrix PNG (default: beside --out)")


def _summary(result: dict) -> str:
    return (f"zero-shot top-1 {result['top1']:.3f} (chance {result['chance_top1']:.3f}) "
            f"on {result['num_samples']} samples")


register(Eval("zeroshot", ZeroShotEval, _run, check=_check, inputs=_inputs, metrics=("top*",),
              label=lambda cfg, item: f"{item.modality}/{Path(item.data or cfg.data.val).name}",
              task=("zero-shot-{modality}-classification", "zero-shot {modality} classification"),
              summary=_summary, cli=_flags, help="zero-shot classification from text prompts"))
