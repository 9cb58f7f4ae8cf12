"""A config from plain data: each value coerced to, or refused by, its field's annotation, with errors that name
the dotted key. The loader (mmpt.config.loader) and the checks (a source's merged augmentation) build through it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from mmpt.config.schema import MINIMAL_WORDS, Config
from mmpt.errors import ConfigError

# Keys that have moved, old -> new: an old run's config is upgraded (mmpt.config.loader.upgrade_old_keys), a new
# file's mistake is told where the key is now.
RENAMED_KEYS = {"model.video_frames": "model.video.num_frames", "model.tubelet": "model.video.tubelet",
                "model.audio_frames": "model.audio.fbank_frames", "model.audio_mel": "model.audio.num_mel_bins",
                "model.audio_patch": "model.audio.patch", "model.video.frames": "model.video.num_frames",
                "model.audio.frames": "model.audio.fbank_frames", "model.audio.mel": "model.audio.num_mel_bins"}

def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate one leaf value against its annotation; raise naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _check_value(value, inner[0], key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
    if origin is list or tp is list:
        if isinstance(value, list):
            item = args[0] if args else Any
            if dataclasses.is_dataclass(item):
                return [build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
            return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            item = args[1] if args else Any
            if dataclasses.is_dataclass(item):
                return {k: build(item, v, f"{key}.{k}.") for k, v in value.items()}
            return {k: _check_value(v, item, f"{key}.{k}") for k, v in value.items()}
    elif _scalar_ok(value, tp):
        return float(value) if tp is float else value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _scalar_ok(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-4" as a string
        try:
            float(value)
            return True
        except ValueError:
            return False
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, (int, float)) if tp is float else isinstance(value, tp)


def build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            moved = RENAMED_KEYS.get(f"{prefix}{key}")
            hint = f"; it is {moved} now" if moved else ""
            raise ConfigError(f"unknown key '{prefix}{key}' (valid: {', '.join(sorted(names))}){hint}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and hasattr(tp, "minimal") and is_minimal(value):
            kwargs[key] = tp.minimal()
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def is_minimal(value: Any) -> bool:
    return any(value is word if isinstance(word, bool) else value == word for word in MINIMAL_WORDS)


def resolve_augment(default: Any, override: Any, key: str) -> Any:
    """A source's augmentation: data.augment with the source's `augment` merged into it field by field
    (`{audio: {noise_p: 0}}` changes one field), the least (minimal()) for false / "none", unchanged by None or
    true. Errors name `key` (data.sources[i].augment) and the field."""
    if override is None or override is True:
        return default
    if is_minimal(override):
        return type(default).minimal()
    if not isinstance(override, dict):
        raise ConfigError(f"{key}={override!r}: expected per-modality changes ({{audio: {{noise_p: 0}}}}) or false")
    merged: dict = dataclasses.asdict(default)
    for section, fields in override.items():
        base = merged.get(section)
        merged[section] = {**base, **fields} if isinstance(base, dict) and isinstance(fields, dict) else fields
    return build(type(default), merged, f"{key}.")


def source_augment(cfg: Config, index: int) -> Any:
    """The resolved training augmentation of data.sources[index]."""
    return resolve_augment(cfg.data.augment, cfg.data.sources[index].augment, f"data.sources[{index}].augment")


