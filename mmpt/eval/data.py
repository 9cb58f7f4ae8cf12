"""Evaluation data for zero-shot and retrieval: shards, a folder per class, or a manifest, as batch dicts.

    for batch in eval_batches("data/esc50.csv", ["audio"], cfg, batch_size=64, workers=2, labels=True): ...

`data` is one of
- a shard spec (a directory with sizes.json, a brace pattern, a glob, `pipe:`/URLs): `mmpt.data.stream.eval_loader`,
  split by node and worker;
- a folder of media files: with labels, ImageFolder style (the class of a file is its folder under the root,
  numbered in sorted order as `mmpt.data.build.folder_rows` numbers them); a caption is the file's `.txt`;
- a CSV or JSONL manifest: a column per modality (paths relative to the manifest, `text` inline) and `label`.

Folders and manifests are decoded directly with the registry's decoders (eval mode) by a map-style Dataset in
a DataLoader with `workers` processes; rank r of N takes rows r, r + N, ... Every batch is
{modality: tensor, "label": (B,) long (-1 = none), "__key__": [str], "_skipped": {"reasons": {...}}}; a
sample that fails to decode is skipped and counted, never raised.
"""
from __future__ import annotations

import logging
import os
import random
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmpt import modality as registry
from mmpt.data.build import BAD_JSON, folder_rows
from mmpt.data.media import BadSample, DecodeSpec
from mmpt.data.resumable import collate
from mmpt.data.shards import DataError, read_manifest
from mmpt.data.stream import eval_loader
from mmpt.distributed import dist_info

log = logging.getLogger("mmpt.eval")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
_logged: set = set()  # skip reasons already logged by this process


def data_kind(data: str) -> str:
    """'manifest', 'folder' or 'shards'. A directory holding sizes.json or tars is shards."""
    path = Path(data)
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if path.is_dir() and not (path / "sizes.json").exists() and not any(path.glob("*.tar")):
        return "folder"
    return "shards"


def _label(value, where: str) -> int:
    if value in (None, ""):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a class index (an integer from 0)") from None


def file_rows(data: str, labels: bool) -> tuple[list, Path]:
    """[(key, row)] of a folder or manifest (every rank gets the same list) and the base of relative paths."""
    if data_kind(data) == "manifest":
        rows, base = list(read_manifest(data)), Path(data).parent
        where = [f"manifest {data}: row {i + 1}" for i in range(len(rows))]
    else:
        rows, base = folder_rows(data, labels_from_folders=labels), Path(".")
        where = [f"folder {data}: class {row.get('class', '?')}" for row in rows]
    if not rows:
        raise DataError(f"{data}: no samples (an empty eval set)")
    for row, at in zip(rows, where, strict=True):
        row["label"] = _label(row.get("label"), at)
    return [(f"{i:09d}", row) for i, row in enumerate(rows)], base


class FileEvalSet(Dataset):
    """This rank's rows of a folder or manifest, decoded with the registry's decoders (eval mode)."""

    def __init__(self, rows: list, base: Path, modalities: list, spec: DecodeSpec):
        rank, world = dist_info()
        self.rows, self.base, self.modalities, self.spec = rows[rank::world], base, modalities, spec

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, row: dict, name: str):
        """The row's value for `name` (a path, or inline content), or a carrier's file (a video's sound)."""
        spec = registry.get(name)
        value = row.get(name)
        if value in (None, "") and spec.carried_by is not None:
            value = row.get(spec.carried_by)
        if value in (None, ""):
            raise BadSample(f"missing_{name}", f"row has {sorted(k for k in row if k in registry.MODALITIES)}")
        if spec.inline:
            return str(value)
        path = Path(value) if os.path.isabs(str(value)) else self.base / str(value)
        try:
            return path.read_bytes()
        except OSError as e:
            raise BadSample(f"missing_{name}", f"{path}: {e.strerror}") from None

    def __getitem__(self, i: int) -> dict:
        key, row = self.rows[i]
        if BAD_JSON in row:  # unreadable metadata (maybe the caption): skipped, as `shards build` refuses it
            return {"__key__": key, "_bad": "bad_json", "_detail": row[BAD_JSON]}
        out = {"__key__": key, "label": row["label"]}
        try:
            for name in self.modalities:
                data = self._source(row, name)
                try:
                    out[name] = registry.get(name).decode(data, self.spec, False, random.Random(0))
                except BadSample as e:
                    raise BadSample(f"{e.reason}_{name}", str(e)) from None
        except BadSample as e:
            return {"__key__": key, "_bad": e.reason, "_detail": str(e)}
        return out


def collate_eval(samples: list, modalities: list) -> dict:
    """Stack the good samples; count (and log the first of each reason) the bad ones."""
    bad = [s for s in samples if "_bad" in s]
    for s in bad:
        if s["_bad"] not in _logged:
            _logged.add(s["_bad"])
            log.warning("skipping bad eval sample (%s) %s: %s (further ones are counted, not logged)",
                        s["_bad"], s["__key__"], s["_detail"])
    good = [s for s in samples if "_bad" not in s]
    batch = collate(good, modalities) if good else {"label": torch.zeros(0, dtype=torch.long), "__key__": []}
    batch["_skipped"] = {"reasons": dict(Counter(s["_bad"] for s in bad)), "shards": {}}
    return batch


def eval_batches(data: str, modalities: list, cfg, batch_size: int, workers: int, labels: bool):
    """Batches of this rank's share of `data` (see the module docstring). labels: folders give class labels."""
    spec = DecodeSpec.from_config(cfg)
    if data_kind(data) == "shards":
        return eval_loader(data, list(modalities), spec, batch_size, workers)
    rows, base = file_rows(data, labels)
    dataset = FileEvalSet(rows, base, list(modalities), spec)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=partial(collate_eval, modalities=list(modalities)))


def progress(batches, desc: str):
    """A progress bar on rank 0 when stderr is a terminal (tqdm's disable=None): piped or logged stderr keeps
    whole lines, where the bar's carriage returns would glue it to the next message (an error line too)."""
    return tqdm(batches, desc=desc, leave=False, disable=True if dist_info()[0] != 0 else None)


def skipped_count(batch: dict) -> int:
    return sum(batch["_skipped"]["reasons"].values())


def check_model(model, cfg, modalities: list, what: str) -> None:
    """One error line when the model lacks a modality the eval needs (the model's own config says)."""
    have = list(getattr(getattr(model, "cfg", None), "modalities", cfg.model.modalities))
    missing = [m for m in modalities if m not in have]
    if missing:
        raise DataError(f"{what} needs {' and '.join(modalities)}; the model has no {', '.join(missing)} "
                        f"(its modalities: {', '.join(have)})")


def model_inputs(model, batch: dict, name: str) -> torch.Tensor:
    """A batch tensor on the model's device, in its dtype where it holds floats (token ids stay integers)."""
    param = next(model.parameters())
    x = batch[name]
    return x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device)
