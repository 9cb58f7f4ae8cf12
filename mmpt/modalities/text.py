"""Text: captions tokenised (open_clip's BPE or a local HuggingFace tokenizer) to `model.context_length` ids; the
text stem embeds them and marks the end-of-text token the head pools. Text is the modality zero-shot prompts and
the caption decoder are written in (mmpt.modality.TEXT), and manifests hold it inline.
"""
from __future__ import annotations

import torch

from mmpt.data import media
from mmpt.model.stems import TextStem
from mmpt.modality import TEXT, Modality, register

ENTRY = register(Modality(
    TEXT, ("txt",), media.decode_text, media.probe_text,
    stem=lambda c: TextStem(c.width, c.vocab_size, c.context_length, c.eot_id),
    tokens=lambda c: c.context_length, inline=True,
    sample_shape=lambda d: (d.context_length,), sample_dtype=torch.int64))
