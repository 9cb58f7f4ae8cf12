"""Stems: a modality's input -> tokens (B, N, D) + key mask (B, N), True = real token.

One patch stem class serves image, video and audio — modality is configuration, not a class: it takes a
(B, C, T, H, W) volume, and the modality registry (`mmpt.modality`) says how each batch tensor becomes one
(an image is a one-frame volume, or, with `model.image_as_video`, repeated frames for the video stem as IMP
does; a video is cut into t x p x p tubelets; a log-mel spectrogram is a one-channel image F x M). The
projection to tokens is one linear layer per patch (ViT; `model.stem: linear`) or early convolutions with the
same token grid (`model.stem: conv`).
Position embeddings are factorised (time x space) and interpolated, so one model serves several resolutions,
frame counts and clip durations. DropToken (VATT/IMP) keeps a random subset of patch tokens at train time.
The model holds the stems in a ModuleDict keyed by modality and adds the modality embeddings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def valid_mask(tokens: torch.Tensor, eot: int) -> torch.Tensor:
    """True up to and including the first EOT of each row (id 0 is a real BPE token, so no `!= 0`)."""
    is_eot = tokens == eot
    has_eot = is_eot.any(dim=1, keepdim=True)
    first = torch.where(has_eot, is_eot.int().argmax(dim=1, keepdim=True),
                        tokens.new_full((tokens.size(0), 1), tokens.size(1) - 1))
    return torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0) <= first


def conv_patchify(channels: int, width: int, patch: tuple) -> nn.Sequential:
    """Early convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"): 3x3 stride-2
    convolutions halve the frame log2(p) times while the channels double up to width/2, then a t x 1 x 1
    convolution joins the tubelet's frames. Same token grid as the linear t x p x p patch."""
    t, ph, pw = patch
    if ph != pw or ph < 2 or ph & (ph - 1):
        raise ValueError(f"conv stem: patch {ph}x{pw} must be square and a power of two")
    stages = ph.bit_length() - 1
    layers: list[nn.Module] = []
    cin = channels
    for i in range(stages):
        cout = max(8, width >> (stages - i))
        layers += [nn.Conv3d(cin, cout, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
                   nn.GroupNorm(1, cout), nn.GELU()]
        cin = cout
    layers.append(nn.Conv3d(cin, width, (t, 1, 1), stride=(t, 1, 1)))
    return nn.Sequential(*layers)


class PatchStem(nn.Module):
    def __init__(self, width: int, channels: int, patch: tuple, grid: tuple, drop_token: float = 0.0,
                 kind: str = "linear"):
        super().__init__()
        self.patch, self.drop_token = tuple(patch), drop_token
        self.proj = (nn.Conv3d(channels, width, kernel_size=self.patch, stride=self.patch) if kind == "linear"
                     else conv_patchify(channels, width, self.patch))
        self.pos_time = nn.Parameter(torch.randn(1, width, grid[0]) * 0.02)
        self.pos_space = nn.Parameter(torch.randn(1, width, grid[1], grid[2]) * 0.02)

    def flops_per_token(self) -> int:
        """Forward FLOPs of the projection per token (each convolution's multiply-adds x 2; norms left out)."""
        flops, stride = 0, (1, 1, 1)
        for conv in (m for m in self.proj.modules() if isinstance(m, nn.Conv3d)):
            stride = tuple(a * b for a, b in zip(stride, conv.stride, strict=True))
            positions = math.prod(p // s for p, s in zip(self.patch, stride, strict=True))
            flops += 2 * positions * conv.weight.numel()
        return flops

    def position(self, t: int, h: int, w: int) -> torch.Tensor:
        space = self.pos_space
        if space.shape[-2:] != (h, w):
            space = F.interpolate(space, size=(h, w), mode="bicubic", align_corners=False)
        time = self.pos_time
        if time.shape[-1] != t:
            time = F.interpolate(time, size=t, mode="linear", align_corners=False)
        return space[:, :, None] + time[..., None, None]  # (1, D, T, H, W)

    def forward(self, volume: torch.Tensor, drop_token: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """volume (B, C, T, H, W); T, H, W at least one patch each (a shorter remainder is cut off).
        drop_token: this call's rate (a task's own); None: the stem's."""
        drop = self.drop_token if drop_token is None else drop_token
        t, h, w = (size - size % p for size, p in zip(volume.shape[2:], self.patch, strict=True))
        x = self.proj(volume[:, :, :t, :h, :w])  # whole patches only, as the linear patch's stride does
        x = (x + self.position(*x.shape[2:])).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.training and drop > 0:
            keep = max(1, round(x.size(1) * (1 - drop)))
            idx = torch.rand(x.shape[:2], device=x.device).argsort(1)[:, :keep].sort(1).values
            x = x.gather(1, idx[..., None].expand(-1, -1, x.size(2)))
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class TextStem(nn.Module):
    """Token + position embeddings; the mask covers SOT .. EOT of each caption."""

    def __init__(self, width: int, vocab_size: int, context_length: int, eot_id: int):
        super().__init__()
        self.eot_id = eot_id
        self.token = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        nn.init.normal_(self.token.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, drop_token: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.size(1) > self.pos.size(1):
            raise ValueError(f"text length {tokens.size(1)} exceeds model.context_length={self.pos.size(1)}")
        return self.token(tokens) + self.pos[:, : tokens.size(1)], valid_mask(tokens, self.eot_id)
