"""Text: captions tokenised (open_clip's BPE or a local HuggingFace tokenizer) to `model.context_length` ids; the
text stem embeds them and marks the end-of-text token the head pools. Text is the modality zero-shot prompts and
the caption decoder are written in (mmpt.modality.TEXT), and manifests hold it inline.
"""
from __future__ import annotations

import random

import torch

from mmpt.data.media import DecodeSettings
from mmpt.data.samples import BadSample
from mmpt.data.tokenizer import get_tokenizer
from mmpt.modality import TEXT, Modality, register
from mmpt.model.stems import TextStem


def read_text(data: bytes | str) -> str:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
    if not text.strip():
        raise BadSample("empty", "blank text")
    return text.strip()


def decode_text(data: bytes | str, settings: DecodeSettings, train: bool, rng: random.Random) -> torch.Tensor:
    """(context_length,) token ids: SOT ... EOT, then padding."""
    return get_tokenizer(settings.tokenizer, settings.context_length).encode(read_text(data))


def probe_text(data: bytes | str) -> dict:
    return {"words": len(read_text(data).split())}


ENTRY = register(Modality(
    TEXT, ("txt",), decode_text, probe_text,
    stem=lambda c: TextStem(c.width, c.vocab_size, c.context_length, c.eot_id),
    tokens=lambda c: c.context_length, inline=True,
    sample_shape=lambda d: (d.context_length,), sample_dtype=torch.int64))
