"""One webdataset sample (bytes per key) -> tensors keyed by modality, for the modalities a source pairs.

Bad input never raises out of the stream: `SampleDecoder` raises `BadSample` with a reason tagged by
modality (e.g. `undecodable_video`), which the stream counts and reports (see `mmpt.data.stream`).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from mmpt.data.media import (AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS, AudioSpec, BadSample, VideoSpec, decode_audio,
                             decode_image, decode_video)
from mmpt.data.tokenizer import Tokenizer

MEDIA_EXTS = {"image": IMAGE_EXTS, "video": VIDEO_EXTS, "audio": AUDIO_EXTS}
KNOWN_KEYS = {"txt", "json", "cls", *IMAGE_EXTS, *VIDEO_EXTS, *AUDIO_EXTS}
MODALITIES = ("image", "video", "audio", "text")


@dataclass
class DecodeSpec:
    image_size: int = 32
    video: VideoSpec = field(default_factory=VideoSpec)
    audio: AudioSpec = field(default_factory=AudioSpec)
    context_length: int = 16
    tokenizer: str = "openclip"


def media_key(sample: dict, modality: str) -> str | None:
    return next((k for k in MEDIA_EXTS[modality] if k in sample), None)


def sample_text(sample: dict) -> str:
    raw = sample.get("txt")
    if raw is None:
        raise BadSample("missing_text")
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    if not text.strip():
        raise BadSample("empty_text")
    return text.strip()


def sample_label(sample: dict) -> int:
    if "json" not in sample:
        return int(sample["cls"]) if "cls" in sample else -1
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", str(e)) from None
    return int(meta.get("label", -1)) if isinstance(meta, dict) else -1


class SampleDecoder:
    """Decode the given modalities of a sample; audio falls back to the video file's audio track."""

    def __init__(self, modalities: list, spec: DecodeSpec, train: bool):
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown} (known: {', '.join(MODALITIES)})")
        self.modalities, self.spec, self.train = list(modalities), spec, train
        self.tokenizer = Tokenizer(spec.tokenizer, spec.context_length) if "text" in modalities else None

    def _media(self, sample: dict, modality: str, rng: random.Random):
        key = media_key(sample, modality)
        if key is None and modality == "audio":
            key = media_key(sample, "video")  # the audio track of a video file
        if key is None:
            present = sorted(k for k in sample if not k.startswith("__"))
            unknown = [k for k in present if k not in KNOWN_KEYS]
            raise BadSample("unknown_extension" if unknown else f"missing_{modality}", f"keys {present}")
        try:
            if modality == "image":
                return decode_image(sample[key], self.spec.image_size, self.train, rng)
            if modality == "video":
                return decode_video(sample[key], self.spec.video, self.train, rng)
            return decode_audio(sample[key], self.spec.audio, self.train, rng)
        except BadSample as e:
            raise BadSample(f"{e.reason}_{modality}", str(e)) from None

    def __call__(self, sample: dict) -> dict:
        rng = random.Random(sample.get("__seed__", 0))
        out = {"__key__": sample.get("__key__", "?"), "__url__": sample.get("__url__", "?")}
        for modality in self.modalities:
            if modality == "text":
                out["text"] = self.tokenizer.encode(sample_text(sample))
            else:
                out[modality] = self._media(sample, modality, rng)
        out["label"] = sample_label(sample)
        return out
