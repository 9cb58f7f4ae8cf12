"""The modality registry: everything mmpt knows about one modality, in one entry.

    from mmpt.modality import MODALITIES, pair_name
    MODALITIES["audio"].extensions          # ('flac', 'wav', 'mp3', 'ogg', 'm4a')
    pair_name("text", "video")              # 'video-text': the one spelling of a pair

An entry holds a modality's webdataset keys, its decoder and probe, its stem and how a batch tensor becomes
the stem's input, its encoder tokens and FLOPs accounting, its default zero-shot prompts, and the dataclasses of
its config sections (`data.<name>`, `model.<name>`, `data.augment.<name>`, task terms) with their checks. Shard
building and checking, decoding, the model, `mmpt model info`, the config schema and checks and the CLI look
modalities up here. The built-in entries live one file each in `mmpt.modalities` (imported by `mmpt/__init__`).
A new modality (depth, thermal, IMU, ...) is one `register(Modality(...))` in a module of yours, named in the run
config's `plugins` list so that every torchrun process and every later eval or export imports it too
(tests/test_modality.py registers a 1-D sensor with a config section of its own).

A modality pair is spelled `a-b` with the modalities in registry order — image, video, audio, then registered
extensions by name, text last — whatever order plugins are imported in: `image-text`, `video-audio`,
`depth-text`. Parameter names, task names, loss and metric keys and JSON results all use it.

This module is the registry's core: it imports no entry, and data, model and config import it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TEXT = "text"  # the modality the caption decoder writes and zero-shot prompts are made of
BUILTIN_ORDER = ("image", "video", "audio")  # then extensions by name, then text
METADATA_KEYS = ("json", "cls")  # sample keys that are no modality


@dataclass(frozen=True)
class Modality:
    name: str  # lower-case letters and digits: it appears in pair names, metric keys and parameter names
    extensions: tuple[str, ...]  # webdataset keys (file extensions) of its files, preferred first
    decode: Callable  # (bytes, DecodeSettings, train, rng) -> the tensor one sample puts in a batch
    probe: Callable  # bytes -> {stat: number}; raises media.BadSample for a file training could not use
    stem: Callable[..., nn.Module]  # ModelConfig -> module: stem input -> (tokens (B, N, D), key mask (B, N))
    tokens: Callable[..., int]  # ModelConfig -> encoder tokens of one sample at the config's nominal size
    stem_input: Callable = lambda x, repeat: x  # (batch tensor, times an image is repeated in time) -> stem input
    # (batch tensor as the loader sends it, the stem's dtype) -> the stem's values, on the device: loaders send
    # compact media (uint8 pixels, float16 fbank) and the model normalises and casts them in its own dtype
    to_float: Callable = lambda x, dtype: x.to(dtype) if x.is_floating_point() else x
    # DecodeSettings -> the shape of one decoded sample and its dtype as the loader sends it (shared-memory
    # accounting, mmpt.data.budget); None: not accounted
    sample_shape: Optional[Callable] = None
    sample_dtype: torch.dtype = torch.float32
    inputs_per_token: Callable[..., int] = lambda cfg: 0  # values one token's projection reads (stem FLOPs)
    templates: tuple[str, ...] = ()  # default zero-shot prompts, "{}" = the class name
    carried_by: Optional[str] = None  # a modality whose files may carry this one (audio: a video's sound)
    # Time alignment of a carried modality with its carrier (VATT): the carrier's decoder that also returns the
    # (start, end) seconds it covers, and the carried one's decoder taking that window as a last argument.
    timed: Optional[Callable] = None
    in_window: Optional[Callable] = None
    inline: bool = False  # manifests hold the content itself (a caption), not a file path
    shard_keys: dict[str, str] = field(default_factory=dict)  # extension -> key written to shards (jpeg: jpg)
    # Config sections, composed into the schema (mmpt.config.schema) under the modality's name: data.<name>,
    # model.<name>, data.augment.<name> (training augmentation; its class's minimal() is what `false` selects).
    data_config: Optional[type] = None
    model_config: Optional[type] = None
    augment_config: Optional[type] = None
    # data.tasks.<pair>.<term> -> (the run-wide key it stands in for, its type): a task's own value of a setting
    task_terms: dict[str, tuple[str, Any]] = field(default_factory=dict)
    # Checks of its sections (mmpt.config.checks): cfg -> [(key, value, holds, what it needs)], and the same for
    # one resolved augmentation section: (dotted prefix, section) -> rules. `positive` lists keys that must be > 0.
    rules: Callable[..., list] = lambda cfg: []
    augment_rules: Callable[..., list] = lambda prefix, section: []
    positive: tuple[str, ...] = ()
    # (a source's resolved augment section) -> None: lists what it names (noise files) before training starts, so
    # a wrong path fails now, naming the key
    prepare: Callable[..., None] = lambda augment: None
    # ModelConfig -> (another modality whose stem encodes this one, times its input is repeated), or None: its own
    shares_stem: Callable[..., Optional[tuple[str, int]]] = lambda cfg: None


MODALITIES: dict[str, Modality] = {}


def _rank(name: str) -> tuple:
    if name in BUILTIN_ORDER:
        return (0, BUILTIN_ORDER.index(name), "")
    return (2, 0, "") if name == TEXT else (1, 0, name)


def register(entry: Modality, replace: bool = False) -> Modality:
    """Add a modality (or, with replace=True, redefine one in place). Returns the entry."""
    if not entry.name.isalnum() or entry.name != entry.name.lower():
        raise ValueError(f"modality name {entry.name!r}: use lower-case letters and digits only")
    if entry.name in MODALITIES and not replace:
        raise ValueError(f"modality '{entry.name}' is registered already (pass replace=True to redefine it)")
    taken = {e: m.name for m in MODALITIES.values() if m.name != entry.name for e in m.extensions}
    clash = [e for e in entry.extensions if e in taken or e in METADATA_KEYS]
    if clash:
        owners = [taken.get(e, "metadata") for e in clash]
        raise ValueError(f"modality '{entry.name}': extension(s) {clash} belong to {owners}")
    entries = {**MODALITIES, entry.name: entry}
    MODALITIES.clear()
    MODALITIES.update(sorted(entries.items(), key=lambda item: _rank(item[0])))
    return entry


def get(name: str) -> Modality:
    if name not in MODALITIES:
        raise KeyError(f"unknown modality '{name}' (known: {', '.join(MODALITIES)})")
    return MODALITIES[name]


def ordered(names) -> list[str]:
    """Modality names in registry order."""
    return sorted(names, key=_rank)


def pair_name(a: str, b: str) -> str:
    return "-".join(ordered((a, b)))


def pairs(names) -> list[tuple[str, str]]:
    """Every pair of the given modalities, each in registry order."""
    names = ordered(set(names))
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def known_keys() -> set[str]:
    return {e for m in MODALITIES.values() for e in m.extensions} | set(METADATA_KEYS)


def modality_of_extension(ext: str) -> Optional[str]:
    return next((m.name for m in MODALITIES.values() if ext in m.extensions), None)


def sample_key(sample: dict, name: str) -> tuple[Optional[str], bool]:
    """The key holding `name` in a webdataset sample, and whether another modality's file carries it."""
    entry = MODALITIES[name]
    key = next((k for k in entry.extensions if k in sample), None)
    if key is None and entry.carried_by is not None:
        carrier = next((k for k in MODALITIES[entry.carried_by].extensions if k in sample), None)
        return carrier, carrier is not None
    return key, False


def stem_plan(cfg) -> dict[str, tuple[str, int]]:
    """ModelConfig -> {modality: (the stem that encodes it, times its input is repeated in time)}: its own stem,
    or another's where its entry shares one (IMP's images through the video stem, model.image_as_video)."""
    return {m: MODALITIES[m].shares_stem(cfg) or (m, 1) for m in cfg.modalities}
