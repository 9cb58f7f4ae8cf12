"""Retrieval in both directions over paired samples: R@1/5/10 and median rank for any pair the model has.

    mmpt eval retrieval --model runs/demo --pair image-text
    run_retrieval(model, cfg, ["image", "text"], "data/demo/val")
    -> {"pair": "image-text", "num_samples": 297, "image_to_text": {"R@1": .., "R@5": .., "R@10": ..,
        "median_rank": ..}, "text_to_image": {...}, "class_only_R@1": .., "skipped": 0, "data": "data/demo/val"}

Each sample's positive is its own partner (a text's is its own caption, one caption per sample); every other
sample of the set is a negative. The rank of a query is 1 + the number of candidates scoring above its
positive; candidates within `TIE` of the positive's cosine similarity count as ties, and ties go to the query:
duplicate captions ("the number 7 written by hand") embed identically, and floating-point noise from how
samples were batched must not reorder them.

Ranks are computed here with torch, not torchmetrics: torchmetrics' retrieval metrics take every query's
scores as a flat (query, candidate) list of N² predictions plus N² targets and indexes, sort each group, and
have no median rank; with one positive per query the positive's rank gives R@k and the median directly, and
the similarity matrix is computed in blocks of queries, never N² at once. The tests check these ranks against
torchmetrics' RetrievalRecall.

`class_only_R@1`, where every sample carries a class label, is the R@1 that embeddings knowing only each sample's
class would reach: on a set where paired sides share nothing but the class (the demo's motion clips: the
soundtrack says the digit, in a voice unrelated to the picture), no model can beat it by much.

Under torch.distributed every rank embeds its split; the embeddings are gathered (all_gather, padded to the
largest split) with their keys (all_gather_object), deduplicated by `__key__` and ordered by key, so each
sample counts once and every rank computes the same result as one process.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmpt import modality as registry
from mmpt.distributed import collective_device, gather_objects
from mmpt.errors import DataError
from mmpt.eval.data import check_model, eval_batches, model_inputs, progress, require_data, skipped_count
from mmpt.evals import COUNTS, Eval, register

KS = (1, 5, 10)
TIE = 1e-6  # cosine similarities this close to the positive's count as ties (won by the query)
QUERY_BLOCK = 1024


def positive_ranks(sim: torch.Tensor, offset: int = 0, tie: float = TIE) -> torch.Tensor:
    """sim (Q, N): query i's positive is column offset + i. 1-based ranks (Q,)."""
    rows = torch.arange(sim.size(0), device=sim.device)
    positive = sim[rows, rows + offset]
    return (sim > positive[:, None] + tie).sum(1) + 1


def rank_metrics(ranks: torch.Tensor, ks: tuple = KS) -> dict:
    """R@k (fraction of queries whose positive is in the top k) and the median rank (the mean of the two
    middle ranks for an even count)."""
    ranks = ranks.double()
    result = {f"R@{k}": float((ranks <= k).double().mean()) for k in ks}
    ordered = ranks.sort().values
    n = ordered.numel()
    result["median_rank"] = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    return result


def retrieval_metrics(sim: torch.Tensor, tie: float = TIE) -> tuple[dict, dict]:
    """A square similarity matrix (rows: side a, columns: side b, positives on the diagonal) -> the metrics
    of a -> b (rows as queries) and of b -> a (columns as queries)."""
    if sim.dim() != 2 or sim.size(0) != sim.size(1):
        raise ValueError(f"retrieval needs a square similarity matrix, got {tuple(sim.shape)}")
    return rank_metrics(positive_ranks(sim, tie=tie)), rank_metrics(positive_ranks(sim.t(), tie=tie))


def embedding_ranks(queries: torch.Tensor, candidates: torch.Tensor, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Ranks of each query's positive (same index) among all candidates, `block` queries at a time."""
    return torch.cat([positive_ranks(queries[i:i + block] @ candidates.t(), offset=i)
                      for i in range(0, queries.size(0), block)])


@torch.no_grad()
def embed_pairs(model, batches, a: str, b: str) -> tuple[list, torch.Tensor, torch.Tensor, int, list]:
    """This rank's keys and unit embeddings of both sides (float32, CPU), the samples skipped, and the samples'
    class labels (-1: none)."""
    keys, emb_a, emb_b, skipped, labels = [], [], [], 0, []
    for batch in progress(batches, f"retrieval {a}-{b}"):
        skipped += skipped_count(batch)
        if not batch["__key__"]:
            continue
        keys += batch["__key__"]
        labels += batch["label"].tolist()
        for name, out in ((a, emb_a), (b, emb_b)):
            out.append(F.normalize(model.encode(name, model_inputs(model, batch, name))["emb"].float(), dim=-1).cpu())
    dim = model.cfg.embed_dim if hasattr(model, "cfg") else 0
    empty = torch.zeros(0, dim)
    return keys, torch.cat(emb_a) if emb_a else empty, torch.cat(emb_b) if emb_b else empty, skipped, labels


def class_only_r1(labels: list) -> float | None:
    """The R@1 of embeddings that knew each sample's class and nothing else (every same-class candidate
    equally likely first): the mean over queries of 1 / (samples of the query's class). Above it, a model
    matches instances, not just classes. None unless every sample has a label."""
    if not labels or min(labels) < 0:
        return None
    sizes = torch.bincount(torch.tensor(labels)).double()
    return float((1.0 / sizes[torch.tensor(labels)]).mean())


def _all_gather_padded(x: torch.Tensor, sizes: list) -> list:
    """Every rank's (n_r, D) tensor, sent padded to the largest n_r (all_gather needs equal shapes)."""
    device, longest = collective_device(), max(sizes)
    padded = torch.zeros(longest, x.size(1), dtype=x.dtype, device=device)
    padded[:x.size(0)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n].cpu() for p, n in zip(parts, sizes, strict=True)]


def gather_unique(keys: list, emb_a: torch.Tensor, emb_b: torch.Tensor, skipped: int, labels: list):
    """All ranks' samples, each key once (the first seen), ordered by key; the total skipped; their labels."""
    if dist.is_available() and dist.is_initialized():
        gathered = gather_objects((keys, emb_a.size(1), skipped, labels))
        sizes = [len(k) for k, _, _, _ in gathered]
        dim = max(d for _, d, _, _ in gathered)
        keys = [key for k, _, _, _ in gathered for key in k]
        labels = [label for _, _, _, ls in gathered for label in ls]
        skipped = sum(s for _, _, s, _ in gathered)
        emb_a = torch.cat(_all_gather_padded(emb_a.reshape(-1, dim), sizes))
        emb_b = torch.cat(_all_gather_padded(emb_b.reshape(-1, dim), sizes))
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    index = [first[k] for k in sorted(first)]
    order = torch.tensor(index, dtype=torch.long)
    return sorted(first), emb_a[order], emb_b[order], skipped, [labels[i] for i in index]


def run_retrieval(model, cfg, modalities: list, data: str, batch_size: int | None = None,
                  workers: int | None = None) -> dict:
    """Retrieval between two modalities of paired samples in `data` (shards, folder or manifest) in both
    directions. Defaults: cfg.eval.batch_size, cfg.eval.workers. Every rank returns the same dict."""
    if len(modalities) != 2 or len(set(modalities)) != 2:
        raise DataError(f"retrieval needs two different modalities, got {list(modalities)}")
    a, b = registry.ordered(modalities)
    check_model(model, cfg, [a, b], "retrieval")
    batch_size = batch_size or cfg.eval.batch_size
    workers = cfg.eval.workers if workers is None else workers
    was_training = model.training
    model.eval()
    try:
        local = embed_pairs(model, eval_batches(data, [a, b], cfg, batch_size, workers, labels=False), a, b)
    finally:
        model.train(was_training)
    keys, emb_a, emb_b, skipped, labels = gather_unique(*local)
    if not keys:
        raise DataError(f"retrieval {data}: no samples with both {a} and {b} (an empty eval set; {skipped} skipped)")
    return {"pair": registry.pair_name(a, b), "num_samples": len(keys),
            f"{a}_to_{b}": rank_metrics(embedding_ranks(emb_a, emb_b)),
            f"{b}_to_{a}": rank_metrics(embedding_ranks(emb_b, emb_a)), "class_only_R@1": class_only_r1(labels),
            "skipped": skipped, "data": data}


@dataclass
class RetrievalEval:
    """One retrieval eval in both directions over paired samples (eval.retrieval[i]; `mmpt eval retrieval`)."""
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    data: Optional[str] = None  # shards of paired samples; None: data.val


def _check(cfg, item: RetrievalEval) -> Optional[str]:
    mods = cfg.model.modalities
    if len(set(item.modalities)) != 2 or any(x not in mods for x in item.modalities):
        return f"modalities={item.modalities}: must name two different modalities of model.modalities={mods}"
    return None


def _inputs(cfg, item: RetrievalEval) -> None:
    require_data(item.data or cfg.data.val)


def _run(model, cfg, item: RetrievalEval, out: str | None = None, **options) -> dict:
    return run_retrieval(model, cfg, list(item.modalities), item.data or cfg.data.val, **options)


class _Pair(argparse.Action):
    """--pair image-text -> modalities [image, text]; another spelling is the parser's one-line error."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = str(values).split("-")
        if len(parts) != 2:
            parser.error(f"{option_string} {values!r}: expected two modalities joined by '-', e.g. image-text")
        setattr(namespace, self.dest, parts)


def _flags(p) -> None:
    p.add_argument("--pair", dest="modalities", action=_Pair, metavar="A-B",
                   help="two modalities of the model, e.g. image-text, video-audio (default: image-text)")
    p.add_argument("--data", help="shards of paired samples (default: data.val)")


def _summary(result: dict) -> str:
    ways = [f"{k.replace('_to_', '->')} R@1 {v['R@1']:.3f}" for k, v in result.items() if isinstance(v, dict)]
    return f"retrieval {result['pair']} on {result['num_samples']} samples: " + ", ".join(ways)


register(Eval("retrieval", RetrievalEval, _run, check=_check, inputs=_inputs, metrics=("*_to_*/*", *COUNTS),
              label=lambda cfg, item: f"{registry.pair_name(*item.modalities)}/{Path(item.data or cfg.data.val).name}",
              task=("{pair}-retrieval", "{pair} retrieval"), summary=_summary, cli=_flags,
              help="R@1/5/10 and median rank in both directions"))
