"""Writing, listing and counting webdataset tar shards (building from manifests: `mmpt.data.build`).

A shard directory holds `PREFIX-000000.tar ...` plus `sizes.json` ({shard file name: sample count}).
Samples use the standard webdataset keys: `jpg`/`png`/`webp`, `mp4`/`webm`/`mkv`, `flac`/`wav`/`mp3`/`ogg`,
`txt` caption, `json` metadata (the class label lives in `json["label"]`).
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from mmpt.errors import DataError

SIZES_FILE = "sizes.json"
MAX_NAMED = 5  # unlisted shards named in the warning
log = logging.getLogger("mmpt.data")
_warned: set = set()  # shard dirs this process has warned about


@dataclass
class WriteReport:
    written: int = 0
    shards: list = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # reason -> count
    refused_examples: dict = field(default_factory=dict)  # reason -> first offending item

    def refuse(self, reason: str, item: str) -> None:
        self.refused[reason] += 1
        self.refused_examples.setdefault(reason, item)

    def summary(self) -> dict:
        return {"written": self.written, "shards": len(self.shards), "refused": dict(self.refused),
                "refused_examples": self.refused_examples}


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str,
                 shard_size: int = 1000) -> WriteReport:
    """Write samples (dicts with `__key__` and encoded fields) into tar shards plus sizes.json."""
    if shard_size <= 0:
        raise DataError(f"shard size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, sizes = WriteReport(), {}
    writer, count = None, 0
    for sample in samples:
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
            name = f"{prefix}-{len(report.shards):06d}.tar"
            writer, count = wds.TarWriter(str(out / name)), 0
            report.shards.append(name)
        writer.write(sample)
        count += 1
        sizes[report.shards[-1]] = count
        report.written += 1
    if writer is not None:
        writer.close()
    # A rewrite with fewer or larger shards must not leave the old set's tail behind, unlisted.
    for stale in set(out.glob(f"{prefix}-[0-9]*.tar")) - {out / name for name in report.shards}:
        stale.unlink()
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1) + "\n")
    return report


def read_json(path: str | os.PathLike, what: str, missing_hint: str = "no such file"):
    """A user-given JSON file; a missing or malformed one is a DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{what} {path}: {missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path}: invalid JSON: {e}") from None
    except OSError as e:  # a directory, no permission, ...
        raise DataError(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def read_sizes(shard_dir: str | os.PathLike) -> dict:
    """{shard file name: sample count} of a shard directory."""
    path = Path(shard_dir) / SIZES_FILE
    sizes = read_json(path, "shard sizes", "missing (a shard directory needs sizes.json; build it with "
                                            "`mmpt shards build`)")
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes.values()):
        raise DataError(f"shard sizes {path}: expected an object {{shard file name: sample count}}")
    return sizes


def unlisted_shards(shard_dir: str | os.PathLike, sizes: dict) -> list[str]:
    """.tar files in the directory that sizes.json does not list: readers never see them."""
    return sorted(p.name for p in Path(shard_dir).glob("*.tar") if p.name not in sizes)


def some_names(names: list) -> str:
    """The first MAX_NAMED names, and how many more there are."""
    more = f", ... ({len(names) - MAX_NAMED} more)" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more


def _warn_unlisted(shard_dir: str, sizes: dict) -> None:
    """A shard copied in by hand (or a build that stopped before writing sizes.json) would be silently left
    out of training and checks: say so once per process, on rank 0."""
    unlisted = unlisted_shards(shard_dir, sizes)
    if not unlisted or shard_dir in _warned or os.environ.get("RANK", "0") != "0":
        return
    _warned.add(shard_dir)
    log.warning("shard dir %s: %d .tar file(s) not listed in its %s are ignored: %s (add them to %s, or rebuild "
                "with `mmpt shards build`)", shard_dir, len(unlisted), SIZES_FILE, some_names(unlisted), SIZES_FILE)


def list_shards(pattern: str) -> list[str]:
    """Expand a shard pattern: a directory with sizes.json, a brace pattern, a glob, or a pipe:/http URL pattern.

    Local files that do not exist are an error here, before any training starts.
    """
    plain = not any(ch in pattern for ch in "*?[{") and "://" not in pattern and not pattern.startswith("pipe:")
    if plain and not os.path.exists(pattern):
        raise DataError(f"shards '{pattern}': no such directory or file")
    if os.path.isdir(pattern):
        sizes = read_sizes(pattern)
        urls = [os.path.join(pattern, name) for name in sizes]
        _warn_unlisted(pattern, sizes)
    elif any(ch in pattern for ch in "*?[") and "://" not in pattern:
        urls = sorted(glob.glob(pattern))
    else:
        urls = wds.shardlists.expand_urls(pattern)
    if not urls:
        raise DataError(f"shards '{pattern}' matches no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise DataError(f"shards '{pattern}': {len(missing)} shard(s) missing, first: {missing[0]}")
    return urls


def read_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a CSV (header line) or JSONL manifest."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"manifest {p}: no such file")
    if p.suffix == ".csv":
        try:
            with p.open(newline="") as f:
                yield from csv.DictReader(f)
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"manifest {p}: unreadable CSV: {e}") from None
        return
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"manifest {p}:{lineno}: invalid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise DataError(f"manifest {p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
                yield row
