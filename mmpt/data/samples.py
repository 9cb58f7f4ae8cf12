"""What one sample's decoding can go wrong with (BadSample, counted and skipped by reason), and the waveform
reader the audio decoder and the noise bank share.
"""
from __future__ import annotations

import io

import torch

MAX_AUDIO_SECONDS = 3600.0


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short stable tag used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def nonempty(data: bytes, kind: str) -> None:
    if not data:
        raise BadSample("zero_length", f"empty {kind}")


def load_waveform(data: bytes) -> tuple[torch.Tensor, int]:
    """Any container torchcodec reads (wav, flac, mp3, ogg, and the audio track of mp4/mkv/webm)."""
    import torchaudio

    nonempty(data, "audio")
    try:
        wav, sr = torchaudio.load(io.BytesIO(data))
    except Exception as e:
        if "audio stream" in str(e):  # a container (e.g. a silent mp4) without an audio track
            raise BadSample("missing", "no audio track") from None
        raise BadSample("undecodable", f"audio: {e}") from None
    if wav.numel() == 0:
        raise BadSample("zero_length", "audio has no samples")
    if wav.size(-1) / sr > MAX_AUDIO_SECONDS:
        raise BadSample("oversize", f"audio lasts {wav.size(-1) / sr:.0f} s")
    return wav, sr
