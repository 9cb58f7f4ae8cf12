"""Per-modality stems: raw batch tensor -> tokens (B, N, D) + key mask (B, N), True = real token.

Each stem adds its own position embedding and a learned modality embedding, so the shared trunk can
tell modalities apart. Stems live in a ModuleDict keyed by modality (see `build_stems`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmpt.data.tokenizer import valid_mask


class ImageStem(nn.Module):
    """Non-overlapping p x p patches; position embeddings are interpolated for other resolutions."""

    def __init__(self, width: int, patch_size: int, image_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, width, self.grid, self.grid) * 0.02)
        self.modality = nn.Parameter(torch.zeros(1, 1, width))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(images)  # (B, D, H/p, W/p)
        pos = self.pos
        if x.shape[-2:] != pos.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2) + self.modality
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class TextStem(nn.Module):
    """Token + position embeddings; the mask covers SOT .. EOT of each caption."""

    def __init__(self, width: int, vocab_size: int, context_length: int, eot_id: int):
        super().__init__()
        self.eot_id = eot_id
        self.token = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.modality = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.token.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.size(1) > self.pos.size(1):
            raise ValueError(f"text length {tokens.size(1)} exceeds model.context_length={self.pos.size(1)}")
        x = self.token(tokens) + self.pos[:, : tokens.size(1)] + self.modality
        return x, valid_mask(tokens, self.eot_id)


def build_stems(cfg) -> nn.ModuleDict:
    """cfg: ModelConfig. Only the modalities the config names are built."""
    makers = {
        "image": lambda: ImageStem(cfg.width, cfg.patch_size, cfg.image_size),
        "text": lambda: TextStem(cfg.width, cfg.vocab_size, cfg.context_length, cfg.eot_id),
    }
    return nn.ModuleDict({m: makers[m]() for m in cfg.modalities})
