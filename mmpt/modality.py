"""The modality registry: everything mmpt knows about one modality, in one entry.

    from mmpt.modality import MODALITIES, pair_name
    MODALITIES["audio"].extensions          # ('flac', 'wav', 'mp3', 'ogg', 'm4a')
    pair_name("text", "video")              # 'video-text': the one spelling of a pair

An entry holds a modality's webdataset keys, its decoder and probe (`mmpt.data.media`), its stem and how a
batch tensor becomes the stem's input (`mmpt.model.stems`), its encoder tokens and FLOPs accounting, and its
default zero-shot prompts. Shard building and checking, decoding, the model, `mmpt model info`, the config
check and the CLI look modalities up here. A new modality (depth, thermal, IMU, ...) is one
`register(Modality(...))` in a module of yours, named in the run config's `plugins` list so that every
torchrun process and every later eval or export imports it too (tests/test_modality.py registers a 1-D sensor).

A modality pair is spelled `a-b` with the modalities in registry order — image, video, audio, then registered
extensions by name, text last — whatever order plugins are imported in: `image-text`, `video-audio`,
`depth-text`. Parameter names, task names, loss and metric keys and JSON results all use it.

The built-in entries reach their decoders (`mmpt.data`) and stems (`mmpt.model`) only when called, so this
module imports neither side and both import it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

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
    decode: Callable  # (bytes, DecodeSpec, train, rng) -> the tensor one sample puts in a batch
    probe: Callable  # bytes -> {stat: number}; raises media.BadSample for a file training could not use
    stem: Callable[..., nn.Module]  # ModelConfig -> module: stem input -> (tokens (B, N, D), key mask (B, N))
    tokens: Callable[..., int]  # ModelConfig -> encoder tokens of one sample at the config's nominal size
    stem_input: Callable = lambda x, frames: x  # (batch tensor, frames to repeat an image to) -> stem input
    # (batch tensor as the loader sends it, the stem's dtype) -> the stem's values, on the device: loaders send
    # compact media (uint8 pixels, float16 fbank) and the model normalises and casts them in its own dtype
    to_float: Callable = lambda x, dtype: x.to(dtype) if x.is_floating_point() else x
    # DecodeSpec -> the shape of one decoded sample and its dtype as the loader sends it (shared-memory
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


MODALITIES: dict[str, Modality] = {}


def _rank(name: str) -> tuple:
    if name in BUILTIN_ORDER:
        return (0, BUILTIN_ORDER.index(name), "")
    return (2, 0, "") if name == TEXT else (1, 0, name)


def register(spec: Modality, replace: bool = False) -> Modality:
    """Add a modality (or, with replace=True, redefine one in place). Returns the spec."""
    if not spec.name.isalnum() or spec.name != spec.name.lower():
        raise ValueError(f"modality name {spec.name!r}: use lower-case letters and digits only")
    if spec.name in MODALITIES and not replace:
        raise ValueError(f"modality '{spec.name}' is registered already (pass replace=True to redefine it)")
    taken = {e: m.name for m in MODALITIES.values() if m.name != spec.name for e in m.extensions}
    clash = [e for e in spec.extensions if e in taken or e in METADATA_KEYS]
    if clash:
        owners = [taken.get(e, "metadata") for e in clash]
        raise ValueError(f"modality '{spec.name}': extension(s) {clash} belong to {owners}")
    entries = {**MODALITIES, spec.name: spec}
    MODALITIES.clear()
    MODALITIES.update(sorted(entries.items(), key=lambda item: _rank(item[0])))
    return spec


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
    spec = MODALITIES[name]
    key = next((k for k in spec.extensions if k in sample), None)
    if key is None and spec.carried_by is not None:
        carrier = next((k for k in MODALITIES[spec.carried_by].extensions if k in sample), None)
        return carrier, carrier is not None
    return key, False


def stem_plan(cfg) -> dict[str, tuple[str, int]]:
    """modality -> (the stem that encodes it, frames its input is repeated to). With `model.image_as_video`
    (IMP) images go through the video stem as one tubelet of repeated frames."""
    plan = {m: (m, 1) for m in cfg.modalities}
    if cfg.image_as_video and "image" in plan and "video" in plan:
        plan["image"] = ("video", cfg.video.tubelet)
    return plan


# ---- the built-in modalities: the stems' arithmetic ------------------------------------------------------

def _media(name: str) -> Callable:
    """mmpt.data.media.<name>, imported on first call."""
    def call(*args):
        return getattr(importlib.import_module("mmpt.data.media"), name)(*args)
    call.__name__ = name
    return call


def _stem(kind: str, *args) -> nn.Module:
    return getattr(importlib.import_module("mmpt.model.stems"), kind)(*args)


def _grid(cfg) -> int:
    return cfg.image_size // cfg.patch_size


def _drop(cfg, name: str) -> float:
    return cfg.drop_token.get(name, 0.0)


def pixels_to_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 3, H, W) uint8 pixels -> CLIP-normalised values in `dtype` (computed in float32 first, so every dtype
    sees the same rounding of one formula). Float input is taken as normalised already (open_clip's preprocess)."""
    if x.is_floating_point():
        return x.to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return ((x.float().div_(255) - mean) / std).to(dtype)


def _repeat_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, frames, H, W) without copying."""
    return x.unsqueeze(2).expand(-1, -1, frames, -1, -1)


register(Modality(
    "image", ("jpg", "jpeg", "png", "webp"), _media("decode_image"), _media("probe_image"),
    stem=lambda c: _stem("PatchStem", c.width, 3, (1, c.patch_size, c.patch_size), (1, _grid(c), _grid(c)),
                         _drop(c, "image"), c.stem),
    tokens=lambda c: _grid(c) ** 2, stem_input=_repeat_frames, to_float=pixels_to_float,
    sample_shape=lambda d: (3, d.image_size, d.image_size), sample_dtype=torch.uint8,
    inputs_per_token=lambda c: 3 * c.patch_size ** 2,
    templates=("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a close-up photo of a {}."),
    shard_keys={"jpeg": "jpg"}))
register(Modality(
    "video", ("mp4", "webm", "mkv", "avi", "mov"), _media("decode_video"), _media("probe_video"),
    stem=lambda c: _stem("PatchStem", c.width, 3, (c.video.tubelet, c.patch_size, c.patch_size),
                             (c.video.frames // c.video.tubelet, _grid(c), _grid(c)), _drop(c, "video"), c.stem),
    tokens=lambda c: _grid(c) ** 2 * (c.video.frames // c.video.tubelet),
    stem_input=lambda x, frames: x.permute(0, 2, 1, 3, 4),  # (B, T, 3, H, W) -> (B, 3, T, H, W)
    to_float=pixels_to_float,
    sample_shape=lambda d: (d.video.num_frames, 3, d.image_size, d.image_size), sample_dtype=torch.uint8,
    timed=_media("decode_video_timed"),
    inputs_per_token=lambda c: 3 * c.video.tubelet * c.patch_size ** 2,
    templates=("a video of {}.", "a video of a person {}.", "a clip of {}.")))
register(Modality(
    "audio", ("flac", "wav", "mp3", "ogg", "m4a"), _media("decode_audio"), _media("probe_audio"),
    stem=lambda c: _stem("PatchStem", c.width, 1, (1, c.audio.patch, c.audio.patch),
                             (1, c.audio.frames // c.audio.patch, c.audio.mel // c.audio.patch), _drop(c, "audio"),
                             c.stem),
    tokens=lambda c: (c.audio.frames // c.audio.patch) * (c.audio.mel // c.audio.patch),
    stem_input=lambda x, frames: x.unsqueeze(2),  # (B, 1, F, M) spectrogram -> one-frame volume
    sample_shape=lambda d: (1, d.audio.num_frames, d.audio.num_mel_bins), sample_dtype=torch.float16,
    in_window=_media("decode_audio"),
    inputs_per_token=lambda c: c.audio.patch ** 2,
    templates=("the sound of {}.", "a sound of a {}.", "a recording of {}."),
    carried_by="video"))
register(Modality(
    TEXT, ("txt",), _media("decode_text"), _media("probe_text"),
    stem=lambda c: _stem("TextStem", c.width, c.vocab_size, c.context_length, c.eot_id),
    tokens=lambda c: c.context_length, inline=True,
    sample_shape=lambda d: (d.context_length,), sample_dtype=torch.int64))
