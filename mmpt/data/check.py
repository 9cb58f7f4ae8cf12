"""Checking shards: decode every sample with the training decoders, report bad ones and statistics.

    mmpt shards check data/mine --workers 4 [--json] [--max-bad 0.001]

Exit code 1 when the bad fraction exceeds --max-bad (default 0: any bad sample fails the check).
"""
from __future__ import annotations

import random
import statistics
from collections import Counter, defaultdict
from multiprocessing import Pool

import webdataset as wds

from mmpt.data import media
from mmpt.data.decode import KNOWN_KEYS, MEDIA_EXTS, sample_label, sample_text
from mmpt.data.shards import list_shards

MAX_LISTED = 100
RNG = random.Random(0)


def _check_sample(sample: dict, stats: dict) -> None:
    """Decode every modality present; raise BadSample naming the first failure; add metadata to stats."""
    keys = [k for k in sample if not k.startswith("__")]
    unknown = [k for k in keys if k not in KNOWN_KEYS]
    if unknown:
        raise media.BadSample("unknown_extension", f"keys {unknown}")
    found = []
    for modality, exts in MEDIA_EXTS.items():
        key = next((k for k in exts if k in sample), None)
        if key is None:
            continue
        found.append(modality)
        data = sample[key]
        try:
            if modality == "image":
                img = media.open_image(data)
                stats["image_width"].append(img.width)
                stats["image_height"].append(img.height)
            elif modality == "video":
                meta = media.probe_video(data)
                media.decode_video(data, media.VideoSpec(num_frames=4, size=32), False, RNG)
                stats["video_duration"].append(meta["duration"])
                stats["video_fps"].append(meta["fps"])
                try:  # an audio track makes the file usable for video-audio pairs too
                    stats["audio_track_duration"].append(media.probe_audio(data)["duration"])
                    found.append("audio_track")
                except media.BadSample:
                    pass
            else:
                meta = media.probe_audio(data)
                stats["audio_duration"].append(meta["duration"])
                stats["audio_sample_rate"].append(meta["sample_rate"])
        except media.BadSample as e:
            raise media.BadSample(f"{e.reason}_{modality}", str(e)) from None
    if "txt" in sample:
        text = sample_text(sample)
        found.append("text")
        stats["caption_words"].append(len(text.split()))
    sample_label(sample)
    if len(found) < 2:
        raise media.BadSample("fewer_than_two_modalities", f"keys {keys}")
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
        except media.BadSample as e:
            bad.append({"shard": url, "key": sample.get("__key__", "?"), "reason": e.reason, "detail": str(e)[:200]})
    return {"shard": url, "samples": n, "bad": bad, "stats": dict(stats)}


def _summary(values: list) -> dict:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "max": max(values)}


def check_shards(spec: str, workers: int = 1) -> dict:
    urls = list_shards(spec)
    if workers > 1:
        with Pool(workers) as pool:
            parts = pool.map(check_shard, urls)
    else:
        parts = [check_shard(u) for u in urls]
    merged, bad = defaultdict(list), []
    for part in parts:
        bad += part["bad"]
        for key, values in part["stats"].items():
            merged[key] += values
    samples = sum(p["samples"] for p in parts)
    return {
        "spec": spec, "shards": len(urls), "samples": samples, "bad": len(bad),
        "bad_fraction": len(bad) / samples if samples else 0.0,
        "bad_by_reason": dict(Counter(b["reason"] for b in bad)),
        "bad_by_shard": dict(Counter(b["shard"] for b in bad).most_common()),
        "bad_samples": bad[:MAX_LISTED],
        "samples_per_modality": dict(Counter(merged.pop("modalities", []))),
        "audio_sample_rates": dict(Counter(merged.pop("audio_sample_rate", []))),
        "stats": {key: _summary(values) for key, values in sorted(merged.items())},
    }


def format_report(report: dict) -> str:
    lines = [f"{report['spec']}: {report['shards']} shards, {report['samples']} samples, "
             f"{report['bad']} bad ({100 * report['bad_fraction']:.2f}%)",
             "per modality: " + ", ".join(f"{m}={n}" for m, n in sorted(report["samples_per_modality"].items()))]
    for key, s in report["stats"].items():
        lines.append(f"  {key:16s} min {s['min']:.4g}  median {s['median']:.4g}  mean {s['mean']:.4g}  max {s['max']:.4g}")
    if report["audio_sample_rates"]:
        lines.append("  audio sample rates: " + ", ".join(f"{r} Hz x{n}" for r, n in report["audio_sample_rates"].items()))
    for reason, n in report["bad_by_reason"].items():
        lines.append(f"bad: {reason} x{n}")
    for b in report["bad_samples"][:20]:
        lines.append(f"  {b['shard']}:{b['key']} {b['reason']} {b['detail']}")
    return "\n".join(lines)
