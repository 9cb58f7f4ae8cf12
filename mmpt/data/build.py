"""Building shards from a manifest (CSV or JSONL) or a folder layout, with every refusal counted by reason.

    mmpt shards build --manifest pairs.jsonl --out data/mine --prefix mine --shard-size 1000 --workers 8
    mmpt shards build --folder photos/ --labels-from-folders --out data/photos --prefix photos

Manifest columns: one per modality (`image`, `video`, `audio`, ... paths relative to the manifest; `text` the
caption itself), `label`, and any other metadata (kept in the sample's json). A folder layout groups files by
path without extension: `cats/001.jpg` + `cats/001.txt` (+ `cats/001.json`) make one sample; with
--labels-from-folders the parent folder names become class labels (sorted, numbered from 0), and a lone media
file (no caption) makes a label-only sample, as an ImageFolder-style eval set needs. A row needs two
modalities, or one and a label. Each media file is probed with the same real decoders training uses, so a
file that would fail in training is refused here, not three days in; so is a sample whose sidecar json is not
a readable JSON object (`bad_json`). Warnings libraries raise while probing (PIL's note on palette PNGs with
transparency, ...) go into the summary's `library_warnings`, counted by message, and one log line says so.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from mmpt import modality
from mmpt.data.media import probe_warned
from mmpt.data.samples import BadSample
from mmpt.data.shards import WriteReport, write_shards
from mmpt.errors import DataError

MAX_FILE_BYTES = 2 << 30
PROBE_REFUSALS = {"zero_length": "empty_file", "oversize": "oversize"}  # any other probe failure: unreadable
BAD_JSON = "__bad_json__"  # a folder row whose sidecar json is unreadable: refused (build) or skipped (eval)
log = logging.getLogger("mmpt.data")


@dataclass
class LibraryWarnings:
    """Warnings libraries raised while probing files, as (file, text) pairs: counted for a report."""
    count: int = 0
    files: set = field(default_factory=set)
    by_message: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # message -> first file that raised it

    def add(self, warned: list) -> None:
        for path, text in warned:
            self.count += 1
            self.files.add(path)
            self.by_message[text] += 1
            self.examples.setdefault(text, path)

    def report(self) -> dict:
        return {"count": self.count, "files": len(self.files), "by_message": dict(self.by_message.most_common()),
                "examples": self.examples}

    def line(self, what: str) -> str:
        return f"{what}: {self.count} library warnings from {len(self.files)} files, see library_warnings in the report"


def read_sidecar(path: Path) -> dict:
    """A folder sample's metadata json: an object, else ValueError saying why."""
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def folder_rows(root: str | os.PathLike, labels_from_folders: bool) -> list:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder {root}: no such directory")
    groups: dict = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        row = groups.setdefault(path.with_suffix(""), {})
        name = modality.modality_of_extension(ext)
        if ext == "json":  # metadata, and a caption if it has one; file paths come from the files themselves
            try:
                meta = read_sidecar(path)
            except ValueError as e:  # refused like an unreadable media file, not the whole build
                row[BAD_JSON] = str(e)
                continue
            row.update({k: v for k, v in meta.items() if k not in modality.MODALITIES or modality.MODALITIES[k].inline})
        elif name is not None and modality.MODALITIES[name].inline:  # a caption file: its content goes in
            row[name] = path.read_text(errors="replace")
        else:
            row[name or "unknown"] = str(path)
    labels = class_folders(root, groups) if labels_from_folders else {}
    rows = []
    for stem, row in groups.items():
        if labels_from_folders:
            cls = stem.parent.relative_to(root).as_posix()
            row.update(label=labels[cls], **{"class": cls})
        rows.append(row)
    return rows


def class_folders(root: Path, groups: dict) -> dict:
    """{class folder: label}. Every leaf folder is a class, an empty one too, so that one class without files does
    not shift the labels of the classes after it; numbered folders (0, 1, 007) keep their number."""
    leaves = {d.relative_to(root).as_posix() for d in root.rglob("*")
              if d.is_dir() and not any(c.is_dir() for c in d.iterdir())}
    names = sorted(leaves | {stem.parent.relative_to(root).as_posix() for stem in groups})
    if all(n.isascii() and n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(names)}


def _file_entry(name: str, value: str, base: str, warned: list) -> tuple:
    """A media file of a row -> ("ok", key, bytes) or ("refused", reason, path), probed as training decodes; the
    library warnings of the probe go to `warned` as (path, text)."""
    path = Path(value) if os.path.isabs(value) else Path(base) / value
    ext = path.suffix.lower().lstrip(".")
    if modality.modality_of_extension(ext) != name:
        return "refused", "unknown_extension", str(path)
    if not path.is_file():
        return "refused", "missing_file", str(path)
    if path.stat().st_size > MAX_FILE_BYTES:
        return "refused", "oversize", str(path)
    data = path.read_bytes()
    try:
        warned += [(str(path), text) for text in probe_warned(modality.MODALITIES[name].probe, data)[1]]
    except BadSample as e:
        return "refused", PROBE_REFUSALS.get(e.reason, "unreadable"), str(path)
    return "ok", modality.MODALITIES[name].shard_keys.get(ext, ext), data


def encode_row(job: tuple) -> tuple[tuple, list]:
    """(index, row, base dir) -> (("ok", sample) or ("refused", reason, item), the library warnings its files'
    probes raised as (path, text)). Runs in pool workers."""
    warned: list = []
    return _encode_row(job, warned), warned


def _encode_row(job: tuple, warned: list) -> tuple:
    index, row, base = job
    sample = {"__key__": f"{index:09d}"}
    if "unknown" in row:
        return "refused", "unknown_extension", row["unknown"]
    if BAD_JSON in row:
        return "refused", "bad_json", row[BAD_JSON]
    files = {m: row[m] for m, entry in modality.MODALITIES.items() if not entry.inline and row.get(m)}
    for name, value in files.items():
        status, key, data = _file_entry(name, str(value), base, warned)
        if status != "ok":
            return status, key, data
        sample[key] = data
    for name in (m for m, entry in modality.MODALITIES.items() if entry.inline and m in row):
        content = str(row[name] or "").strip()
        if not content:
            return "refused", f"empty_{name}", str(next(iter(files.values()), index))
        sample[modality.MODALITIES[name].extensions[0]] = content
    meta = {k: v for k, v in row.items() if k not in modality.MODALITIES}
    labelled = meta.get("label") not in (None, "")
    if labelled:
        try:
            meta["label"] = int(meta["label"])
        except (TypeError, ValueError):
            return "refused", "bad_label", f"{index}: label {meta['label']!r} is not a class index"
    # Two modalities make a training pair; one media file with a label is a classification eval sample.
    if sum(k != "__key__" for k in sample) < (1 if labelled else 2):
        return "refused", "fewer_than_two_modalities", str(index)
    sample["json"] = meta
    return "ok", sample


def build_shards(rows: list, base: str | os.PathLike, out: str | os.PathLike, prefix: str, shard_size: int = 1000,
                 workers: int = 1, shuffle_seed: int | None = 0) -> dict:
    """Validate and encode rows in `workers` processes (order kept), write shards, return the summary."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:  # shards written in random order stream well without a huge shuffle buffer
        random.Random(shuffle_seed).shuffle(order)
    jobs = ((i, rows[i], str(base)) for i in order)
    refused, modalities, warned = WriteReport(), Counter(), LibraryWarnings()

    def accepted(results: Iterator) -> Iterator[dict]:
        for result, warnings in results:
            warned.add(warnings)
            if result[0] == "ok":
                modalities.update(k for k in result[1] if k != "__key__")
                yield result[1]
            else:
                refused.refuse(result[1], result[2])

    if workers > 1:
        with Pool(workers) as pool:
            report = write_shards(accepted(pool.imap(encode_row, jobs, chunksize=16)), out, prefix, shard_size)
    else:
        report = write_shards(accepted(map(encode_row, jobs)), out, prefix, shard_size)
    summary = report.summary()
    summary.update(rows=len(rows), refused=dict(refused.refused), refused_examples=refused.refused_examples,
                   keys=dict(modalities), library_warnings=warned.report())
    if warned.count:
        log.warning(warned.line("shards build"))
    return summary
