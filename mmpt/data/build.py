"""Building shards from a manifest (CSV or JSONL) or a folder layout, with every refusal counted by reason.

    mmpt shards build --manifest pairs.jsonl --out data/mine --prefix mine --shard-size 1000 --workers 8
    mmpt shards build --folder photos/ --labels-from-folders --out data/photos --prefix photos

Manifest columns: `image`, `video`, `audio` (paths, relative to the manifest), `text`, `label`, and any other
metadata (kept in the sample's json). A folder layout groups files by path without extension:
`cats/001.jpg` + `cats/001.txt` (+ `cats/001.json`) make one sample; with --labels-from-folders the parent
folder names become class labels (sorted, numbered from 0). Each media file is probed with the same real
decoders training uses, so a file that would fail in training is refused here, not three days in.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

from mmpt.data import media
from mmpt.data.shards import DataError, WriteReport, write_shards

EXT_MODALITY = {**{e: "image" for e in media.IMAGE_EXTS}, **{e: "video" for e in media.VIDEO_EXTS},
                **{e: "audio" for e in media.AUDIO_EXTS}}
MAX_FILE_BYTES = 2 << 30


def folder_rows(root: str | os.PathLike, labels_from_folders: bool) -> list:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder {root}: no such directory")
    groups: dict = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        row = groups.setdefault(path.with_suffix(""), {})
        if ext == "txt":
            row["text"] = path.read_text(errors="replace")
        elif ext == "json":
            row.update({k: v for k, v in json.loads(path.read_text()).items() if k not in ("image", "video", "audio")})
        else:
            row.setdefault("_files", []).append(str(path))
    classes = sorted({p.parent.relative_to(root).as_posix() for p in groups}) if labels_from_folders else []
    rows = []
    for stem, row in groups.items():
        for f in row.pop("_files", []):
            row[EXT_MODALITY.get(Path(f).suffix.lower().lstrip("."), "unknown")] = f
        if labels_from_folders:
            cls = stem.parent.relative_to(root).as_posix()
            row.update(label=classes.index(cls), **{"class": cls})
        rows.append(row)
    return rows


def encode_row(job: tuple) -> tuple:
    """(index, row, base dir) -> ("ok", sample) or ("refused", reason, item). Runs in pool workers."""
    index, row, base = job
    sample = {"__key__": f"{index:09d}"}
    if "unknown" in row:
        return "refused", "unknown_extension", row["unknown"]
    for modality in ("image", "video", "audio"):
        if not row.get(modality):
            continue
        path = Path(row[modality]) if os.path.isabs(row[modality]) else Path(base) / row[modality]
        ext = path.suffix.lower().lstrip(".")
        if EXT_MODALITY.get(ext) != modality:
            return "refused", "unknown_extension", str(path)
        if not path.is_file():
            return "refused", "missing_file", str(path)
        if path.stat().st_size > MAX_FILE_BYTES:
            return "refused", "oversize", str(path)
        data = path.read_bytes()
        try:
            {"image": media.open_image, "video": media.probe_video, "audio": media.probe_audio}[modality](data)
        except media.BadSample as e:
            return "refused", {"zero_length": "empty_file", "oversize": "oversize"}.get(e.reason, "unreadable"), str(path)
        sample["jpg" if ext == "jpeg" else ext] = data
    if "text" in row:
        text = str(row["text"] or "").strip()
        if not text:
            return "refused", "empty_caption", str(row.get("image") or row.get("video") or row.get("audio") or index)
        sample["txt"] = text
    if sum(k != "__key__" for k in sample) < 2:
        return "refused", "fewer_than_two_modalities", str(index)
    meta = {k: v for k, v in row.items() if k not in ("image", "video", "audio", "text")}
    if meta.get("label") not in (None, ""):
        meta["label"] = int(meta["label"])
    sample["json"] = meta
    return "ok", sample


def build_shards(rows: list, base: str | os.PathLike, out: str | os.PathLike, prefix: str, shard_size: int = 1000,
                 workers: int = 1, shuffle_seed: int | None = 0) -> dict:
    """Validate and encode rows in `workers` processes (order kept), write shards, return the summary."""
    order = list(range(len(rows)))
    if shuffle_seed is not None:  # shards written in random order stream well without a huge shuffle buffer
        random.Random(shuffle_seed).shuffle(order)
    jobs = ((i, rows[i], str(base)) for i in order)
    refused, modalities = WriteReport(), Counter()

    def accepted(results: Iterator) -> Iterator[dict]:
        for result in results:
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
                   keys=dict(modalities))
    return summary
