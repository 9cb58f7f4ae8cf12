"""Evaluation data (zero-shot, retrieval, plugin evals): shards, a folder per class, or a manifest, as batch dicts.

    classes = Classes(["dog", "rain", ...], "esc50.json")  # names a folder per class; manifests carry labels
    for batch in eval_batches("data/esc50", ["audio"], cfg, 64, workers=2, labels=True, classes=classes): ...

`data` is one of
- a shard pattern (a directory with sizes.json, a brace pattern, a glob, `pipe:`/URLs): `mmpt.data.stream.eval_loader`,
  split by node and worker;
- a folder of media files: with classes, ImageFolder style (the class of a file is its folder under the root:
  a folder is named by a class name of the classes file, or all folders are numbered by class index; see
  `folder_labels`); a caption is the file's `.txt`;
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
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmpt import modality as registry
from mmpt.data.build import BAD_JSON, folder_rows
from mmpt.data.media import DecodeSettings
from mmpt.data.resumable import collate
from mmpt.data.samples import BadSample
from mmpt.data.shards import list_shards, read_manifest
from mmpt.data.stream import eval_loader
from mmpt.distributed import dist_info
from mmpt.errors import DataError

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


def require_data(data: str) -> None:
    """At training start: the eval data must be there. A path that is no folder or manifest is a shard pattern, so
    listing its shards names a missing one."""
    if data_kind(data) == "shards":
        list_shards(data)


def _label(value, where: str) -> int:
    if value in (None, ""):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a class index (an integer from 0)") from None


class Classes(NamedTuple):
    """The class names of an eval and the file they came from (named in errors)."""
    names: list
    path: str


def _folder_key(name: str) -> str:
    """Folder and class names compared without case, with `_`/`-` as spaces ("golden_retriever")."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def folder_labels(folders: list, classes: Classes, data: str) -> dict:
    """{class folder: label}. Every folder names a class of the classes file (exactly, else ignoring case and
    `_`/`-` against spaces), or every folder is a class index (0, 1, 007, ...). Labels never come from the
    folders' sorted order: one empty or missing folder would shift every later class. A folder naming no class
    is an error; a class without a folder is logged (its per-class accuracy is null)."""
    exact = {name: i for i, name in enumerate(classes.names)}
    loose: dict = {}
    for i, name in enumerate(classes.names):
        loose.setdefault(_folder_key(name), []).append(i)
    by_name = {f: exact[f] if f in exact else loose[_folder_key(f)][0] for f in folders
               if f in exact or len(loose.get(_folder_key(f), ())) == 1}
    if len(by_name) == len(folders):
        labels = by_name
    elif all(f.isascii() and f.isdigit() for f in folders):
        labels = {f: int(f) for f in folders}
        for f in folders:
            if labels[f] >= len(classes.names):
                raise DataError(f"folder {data}: class folder {f!r} is no class index of classes file {classes.path} "
                                f"({len(classes.names)} classnames: 0..{len(classes.names) - 1})")
    else:
        bad = next(f for f in folders if f not in by_name)
        bad = f"{bad!r}" if bad != "." else "'.' (files directly in it)"
        raise DataError(f"folder {data}: class folder {bad} names no class of classes file {classes.path} "
                        f"(name each folder by a classname, or number them all 0..{len(classes.names) - 1})")
    missing = [classes.names[i] for i in sorted(set(range(len(classes.names))) - set(labels.values()))]
    if missing and dist_info()[0] == 0:
        log.warning("folder %s: %d of %d classes of classes file %s have no files (no folder or an empty one; "
                    "e.g. %r): their accuracy is null", data, len(missing), len(classes.names), classes.path,
                    missing[0])
    return labels


def file_rows(data: str, labels: bool, classes: Classes | None = None) -> tuple[list, Path]:
    """[(key, row)] of a folder or manifest (every rank gets the same list) and the base of relative paths.
    labels: a folder's files are labelled by their class folder, mapped onto `classes` (`folder_labels`)."""
    if data_kind(data) == "manifest":
        rows, base = list(read_manifest(data)), Path(data).parent
        where = [f"manifest {data}: row {i + 1}" for i in range(len(rows))]
    else:
        rows, base = folder_rows(data, labels_from_folders=labels), Path(".")
        where = [f"folder {data}: class {row.get('class', '?')}" for row in rows]
    if not rows:
        raise DataError(f"{data}: no samples (an empty eval set)")
    if labels and data_kind(data) == "folder":
        if classes is None:
            raise DataError(f"folder {data}: labels from class folders need the class names (a classes file)")
        mapping = folder_labels(sorted({row["class"] for row in rows}), classes, data)
        for row in rows:
            row["label"] = mapping[row["class"]]
    for row, at in zip(rows, where, strict=True):
        row["label"] = _label(row.get("label"), at)
    return [(f"{i:09d}", row) for i, row in enumerate(rows)], base


class FileEvalSet(Dataset):
    """This rank's rows of a folder or manifest, decoded with the registry's decoders (eval mode)."""

    def __init__(self, rows: list, base: Path, modalities: list, settings: DecodeSettings):
        rank, world = dist_info()
        self.rows, self.base, self.modalities, self.settings = rows[rank::world], base, modalities, settings

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, row: dict, name: str):
        """The row's value for `name` (a path, or inline content), or a carrier's file (a video's sound)."""
        entry = registry.get(name)
        value = row.get(name)
        if value in (None, "") and entry.carried_by is not None:
            value = row.get(entry.carried_by)
        if value in (None, ""):
            raise BadSample(f"missing_{name}", f"row has {sorted(k for k in row if k in registry.MODALITIES)}")
        if entry.inline:
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
                    out[name] = registry.get(name).decode(data, self.settings, False, random.Random(0))
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


def eval_batches(data: str, modalities: list, cfg, batch_size: int, workers: int, labels: bool,
                 classes: Classes | None = None):
    """Batches of this rank's share of `data` (see the module docstring). labels: a folder's files are labelled
    by their class folder, mapped onto `classes` (shards and manifests carry their own labels)."""
    settings = DecodeSettings.from_config(cfg)
    if data_kind(data) == "shards":
        return eval_loader(data, list(modalities), settings, batch_size, workers)
    rows, base = file_rows(data, labels, classes)
    dataset = FileEvalSet(rows, base, list(modalities), settings)
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
