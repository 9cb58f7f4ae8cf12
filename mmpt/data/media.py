"""What every decoder reads (DecodeSettings) and how a probe's library warnings are kept for the reports.

The decoders live with their modalities (mmpt.modalities.image: PIL, .video: decord, .audio: torchaudio via
torchcodec, .text: the tokenizer); the registry entry (`mmpt.modality`) names each. Every decoder is
`decode(data: bytes, settings: DecodeSettings, train: bool, rng) -> tensor` and raises `BadSample(reason)` for
input it cannot use. In training (`train=True`) it augments as `settings.augment` says (`mmpt.data.augment`),
drawing only from `rng`; eval decoding is deterministic (centre crops and windows). `probe(data) -> {stat:
number}` checks that a file decodes and returns its metadata (for `mmpt shards build`, which refuses what fails,
and `mmpt shards check`).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

from mmpt.config import Config, augment_class
from mmpt.modality import CLIP_MEAN, CLIP_STD, MODALITIES

MEAN, STD = CLIP_MEAN, CLIP_STD


class DecodeSettings:
    """What the decoders read: the model's input sizes, each modality's data section (`settings.video` is
    data.video, by the registry's `data_config`) and the training augmentation of one source (`settings.augment`,
    train=True only). Sections not given take their defaults."""

    def __init__(self, image_size: int = 32, context_length: int = 16, tokenizer: str = "openclip",
                 augment: Optional[Any] = None, jpeg_draft: bool = True, **sections: Any):
        unknown = [name for name in sections if name not in MODALITIES or MODALITIES[name].data_config is None]
        if unknown:
            raise TypeError(f"DecodeSettings: no modality with a data section named {unknown}")
        self.image_size, self.context_length, self.tokenizer = image_size, context_length, tokenizer
        # JPEGs decode at 1/2, 1/4 or 1/8 size when that still covers image_size
        self.jpeg_draft = jpeg_draft
        self.augment: Any = augment if augment is not None else augment_class()()
        self.sections = {m.name: sections.get(m.name) or m.data_config() for m in MODALITIES.values()
                         if m.data_config is not None}

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"DecodeSettings has no {name!r} (data sections: {', '.join(sections)})")

    def replace(self, **changes: Any) -> DecodeSettings:
        kept = {"image_size": self.image_size, "context_length": self.context_length, "tokenizer": self.tokenizer,
                "augment": self.augment, "jpeg_draft": self.jpeg_draft, **self.sections}
        return DecodeSettings(**{**kept, **changes})

    def to_dict(self) -> dict:
        """Plain data (preprocessing.json): the sizes, then each section under its modality's name."""
        return {"image_size": self.image_size, "context_length": self.context_length, "tokenizer": self.tokenizer,
                **{name: dataclasses.asdict(section) for name, section in self.sections.items()},
                "augment": dataclasses.asdict(self.augment), "jpeg_draft": self.jpeg_draft}

    @classmethod
    def from_dict(cls, data: dict, tokenizer: str) -> DecodeSettings:
        """to_dict()'s data back (eval decoding: augmentation left out); keys left out keep their defaults."""
        kwargs = {k: data[k] for k in ("image_size", "context_length", "jpeg_draft") if k in data}
        sections = {name: m.data_config(**data[name]) for name, m in MODALITIES.items()
                    if m.data_config is not None and isinstance(data.get(name), dict)}
        return cls(**kwargs, tokenizer=tokenizer, **sections)

    @classmethod
    def from_config(cls, cfg: Config, augment: Optional[Any] = None) -> DecodeSettings:
        """Run Config -> decode settings (sizes follow the model, so data and stems can't disagree); `augment`: a
        source's own (mmpt.config.source_augment), else data.augment."""
        sections = {name: getattr(cfg.data, name) for name, m in MODALITIES.items() if m.data_config is not None}
        return cls(cfg.model.image_size, cfg.model.context_length, cfg.data.tokenizer, augment or cfg.data.augment,
                   **sections)


def probe_warned(probe, data: bytes) -> tuple[dict, list[str]]:
    """probe(data) and the warnings libraries raised in it, as text ("UserWarning: Palette images with
    Transparency ..."): `mmpt shards build` and `check` count them in their reports instead of letting each one
    print raw between mmpt's own lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = probe(data)
    return meta, [f"{w.category.__name__}: {w.message}" for w in caught]


