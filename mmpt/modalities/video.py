"""Video: MP4/WebM/MKV/AVI/MOV decoded by decord (PyAV probes), cut into tubelet x patch x patch tokens.

Config: `data.video` (which frames are decoded), `model.video` (the stem's tubelets and the frame count its position
embedding is laid out for), `data.augment.video` (the image settings drawn once per clip, plus temporal jitter),
and the task term `data.tasks.<pair>.num_frames`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from mmpt.data import media
from mmpt.modalities.image import ImageAugment, grid, interval, pixel_rules, pixels_to_float
from mmpt.model.stems import PatchStem
from mmpt.modality import Modality, register


@dataclass
class VideoConfig:
    """How video is decoded (data.video)."""
    num_frames: int = 8
    fps: Optional[float] = None  # None: frames spread uniformly over the clip
    window_seconds: Optional[float] = None  # with fps: a random (train) / centred (eval) window of S seconds


@dataclass
class VideoStemConfig:
    """The video stem (model.video): t x p x p tubelets, position embeddings laid out for `num_frames`."""
    num_frames: int = 8  # frames the position embedding is laid out for (other counts interpolate)
    tubelet: int = 2  # frames per token


@dataclass
class VideoAugment(ImageAugment):
    """Training augmentation of video (data.augment.video): one draw of the image settings applied to every
    frame of a clip, plus temporal jitter. crop "mild" is a random square window of the frame."""
    # Temporal jitter: the stride between sampled frames x U(lo, hi) at a random start. Frames spread over
    # the clip (data.video.fps unset): they span lo..hi of it (capped at 1); at data.video.fps: a slower or
    # faster stride. [1, 1]: evenly spread frames, no jitter.
    stride_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])

    @classmethod
    def minimal(cls):
        aug = super().minimal()
        aug.stride_scale = [1.0, 1.0]
        return aug


def _augment_rules(prefix: str, aug: VideoAugment) -> list:
    return pixel_rules(prefix, aug) + [interval(f"{prefix}.stride_scale", aug.stride_scale, 0.0, 4.0)]


def _rules(cfg) -> list:
    m, d = cfg.model, cfg.data
    return [("model.video.num_frames", m.video.num_frames, m.video.num_frames % m.video.tubelet == 0,
             f"must be divisible by model.video.tubelet={m.video.tubelet}"),
            ("data.video.num_frames", d.video.num_frames,
             "video" not in m.modalities or d.video.num_frames >= m.video.tubelet,
             f"fewer than model.video.tubelet={m.video.tubelet} frames")]


def _tokens(cfg) -> int:
    return grid(cfg) ** 2 * (cfg.video.num_frames // cfg.video.tubelet)


ENTRY = register(Modality(
    "video", ("mp4", "webm", "mkv", "avi", "mov"), media.decode_video, media.probe_video,
    stem=lambda c: PatchStem(c.width, 3, (c.video.tubelet, c.patch_size, c.patch_size),
                             (c.video.num_frames // c.video.tubelet, grid(c), grid(c)),
                             c.drop_token.get("video", 0.0), c.stem),
    tokens=_tokens,
    stem_input=lambda x, repeat: x.permute(0, 2, 1, 3, 4),  # (B, T, 3, H, W) -> (B, 3, T, H, W)
    to_float=pixels_to_float,
    sample_shape=lambda d: (d.video.num_frames, 3, d.image_size, d.image_size), sample_dtype=torch.uint8,
    timed=media.decode_video_timed,
    inputs_per_token=lambda c: 3 * c.video.tubelet * c.patch_size ** 2,
    templates=("a video of {}.", "a video of a person {}.", "a clip of {}."),
    data_config=VideoConfig, model_config=VideoStemConfig, augment_config=VideoAugment,
    task_terms={"num_frames": ("data.video.num_frames", Optional[int])},
    rules=_rules, augment_rules=_augment_rules,
    positive=("data.video.num_frames", "data.video.fps", "data.video.window_seconds", "model.video.num_frames",
              "model.video.tubelet")))
