"""Checking shards: probe every sample's modalities as `mmpt shards build` does (the registry's probes, which
decode), report bad ones and statistics per modality.

    mmpt shards check data/mine --workers 4 [--json] [--max-bad 0.001]

Exit code 1 when the bad fraction exceeds --max-bad (default 0: any bad sample fails the check). Warnings
libraries raise while probing are counted in the report (`library_warnings`), not printed raw.
"""
from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from multiprocessing import Pool

import webdataset as wds

from mmpt import modality
from mmpt.data.build import LibraryWarnings
from mmpt.data.decode import sample_label
from mmpt.data.media import probe_warned
from mmpt.data.samples import BadSample
from mmpt.data.shards import list_shards, read_sizes, some_names, unlisted_shards

MAX_LISTED = 100


def _probe(sample: dict, entry: modality.Modality, stats: dict) -> str | None:
    """Probe one modality of a sample; its stats go under `<name>_...` (`<name>_track_...` when another
    modality's file carries it, as a video's sound track), library warnings to stats["warnings"]. Returns what
    was found, if anything."""
    key, carried = modality.sample_key(sample, entry.name)
    if key is None:
        return None
    try:
        meta, warned = probe_warned(entry.probe, sample[key])
        stats["warnings"] += [(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}", w) for w in warned]
    except BadSample as e:
        if carried:  # a video without sound is still a good video
            return None
        raise BadSample(f"{e.reason}_{entry.name}", str(e)) from None
    found = f"{entry.name}_track" if carried else entry.name
    for stat, value in meta.items():
        stats[f"{found}_{stat}"].append(value)
    return found


def _check_sample(sample: dict, stats: dict) -> None:
    """Probe every modality present; raise BadSample naming the first failure; add metadata to stats."""
    keys = [k for k in sample if not k.startswith("__")]
    unknown = [k for k in keys if k not in modality.known_keys()]
    if unknown:
        raise BadSample("unknown_extension", f"keys {unknown}")
    found = [f for f in (_probe(sample, entry, stats) for entry in modality.MODALITIES.values()) if f]
    # A labelled sample with one modality is a classification eval sample, as `shards build` writes them.
    if len(found) < (1 if sample_label(sample) >= 0 else 2):
        raise BadSample("fewer_than_two_modalities", f"keys {keys}")
    stats["modalities"].extend(found)


def check_shard(url: str) -> dict:
    stats, bad, n = defaultdict(list), [], 0

    def on_error(exn):
        bad.append({"shard": url, "key": "?", "reason": "corrupt_tar", "detail": repr(exn)[:200]})
        return True

    for sample in wds.tarfile_to_samples(handler=on_error)(iter([{"url": url}])):
        n += 1
        try:
            _check_sample(sample, stats)
        except BadSample as e:
            bad.append({"shard": url, "key": sample.get("__key__", "?"), "reason": e.reason, "detail": str(e)[:200]})
    return {"shard": url, "samples": n, "bad": bad, "stats": dict(stats)}


MAX_COUNTED = 8  # a stat of at most this many distinct integers (sample rates, channels) also gets counts


def _summary(values: list) -> dict:
    if not values:
        return {}
    out = {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values),
           "max": max(values)}
    if all(isinstance(v, int) for v in values) and len(set(values)) <= MAX_COUNTED:
        out["counts"] = dict(sorted(Counter(values).items()))
    return out


def check_shards(pattern: str, workers: int = 1) -> dict:
    urls = list_shards(pattern)
    if workers > 1:
        with Pool(workers) as pool:
            parts = pool.map(check_shard, urls)
    else:
        parts = [check_shard(u) for u in urls]
    merged, bad, warned = defaultdict(list), [], LibraryWarnings()
    for part in parts:
        bad += part["bad"]
        warned.add(part["stats"].pop("warnings", []))
        for key, values in part["stats"].items():
            merged[key] += values
    samples = sum(p["samples"] for p in parts)
    unlisted = unlisted_shards(pattern, read_sizes(pattern)) if os.path.isdir(pattern) else []
    return {
        "pattern": pattern, "shards": len(urls), "unlisted_shards": unlisted, "samples": samples, "bad": len(bad),
        "bad_fraction": len(bad) / samples if samples else 0.0,
        "bad_by_reason": dict(Counter(b["reason"] for b in bad)),
        "bad_by_shard": dict(Counter(b["shard"] for b in bad).most_common()),
        "bad_samples": bad[:MAX_LISTED],
        "samples_per_modality": dict(Counter(merged.pop("modalities", []))),
        "stats": {key: _summary(values) for key, values in sorted(merged.items())},
        "library_warnings": warned.report(),
    }


def format_report(report: dict) -> str:
    lines = [f"{report['pattern']}: {report['shards']} shards, {report['samples']} samples, "
             f"{report['bad']} bad ({100 * report['bad_fraction']:.2f}%)",
             "per modality: " + ", ".join(f"{m}={n}" for m, n in sorted(report["samples_per_modality"].items()))]
    if report["unlisted_shards"]:  # not checked, and training would not read them either
        lines.append(f"not in sizes.json (not checked, never read): {some_names(report['unlisted_shards'])}")
    for key, s in report["stats"].items():
        line = f"  {key:22s} min {s['min']:.4g}  median {s['median']:.4g}  mean {s['mean']:.4g}  max {s['max']:.4g}"
        counts = ", ".join(f"{value} x{n}" for value, n in s.get("counts", {}).items())
        lines.append(line + (f"  ({counts})" if counts else ""))
    warned = report["library_warnings"]
    if warned["count"]:
        lines.append(f"library warnings: {warned['count']} from {warned['files']} samples (not failures)")
        lines += [f"  {text} x{n} (first: {warned['examples'][text]})" for text, n in warned["by_message"].items()]
    for reason, n in report["bad_by_reason"].items():
        lines.append(f"bad: {reason} x{n}")
    for b in report["bad_samples"][:20]:
        lines.append(f"  {b['shard']}:{b['key']} {b['reason']} {b['detail']}")
    return "\n".join(lines)
