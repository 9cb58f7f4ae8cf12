"""Video: MP4/WebM/MKV/AVI/MOV decoded by decord (PyAV probes), cut into tubelet x patch x patch tokens.

Config: `data.video` (which frames are decoded), `model.video` (the stem's tubelets and the frame count its position
embedding is laid out for), `data.augment.video` (the image settings drawn once per clip, plus temporal jitter),
and the task term `data.tasks.<pair>.num_frames`.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from mmpt.data import augment
from mmpt.data.media import DecodeSettings
from mmpt.data.samples import BadSample, nonempty
from mmpt.modalities.image import ImageAugment, grid, interval, pixel_rules, pixels_to_float
from mmpt.modality import Modality, register
from mmpt.model.stems import PatchStem


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


MAX_VIDEO_FRAMES = 100_000
PROBE_FRAMES = 4  # frames a video probe decodes, spread over the clip (a truncated file fails here)


def _video_reader(data: bytes, size: Optional[tuple] = None):
    import decord

    nonempty(data, "video")
    try:
        kwargs = {"width": size[0], "height": size[1]} if size else {}
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1, **kwargs)
    except Exception as e:
        raise BadSample("undecodable", f"video: {e}") from None
    if len(vr) == 0:
        raise BadSample("zero_length", "video has no frames")
    if len(vr) > MAX_VIDEO_FRAMES:
        raise BadSample("oversize", f"video has {len(vr)} frames")
    return vr


def _frames(data: bytes, size: Optional[tuple], settings: DecodeSettings, train: bool, rng: random.Random) -> tuple:
    """(T, 3, H, W) uint8 frames decoded at `size` (None: native) and the seconds they span; `rng` is left as
    it was found when decoding fails, so a retry at another size draws the same frames."""
    state = rng.getstate()
    try:
        vr = _video_reader(data, size)
        fps = vr.get_avg_fps() or 25.0
        v = settings.video
        idx = frame_indices(len(vr), fps, v.num_frames, v.fps, v.window_seconds, train, rng, settings.augment.video)
        frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
    except BadSample:
        rng.setstate(state)
        raise
    except Exception as e:
        rng.setstate(state)
        raise BadSample("undecodable", f"video frames: {e}") from None
    return frames, (min(idx) / fps, (max(idx) + 1) / fps)


def _crop(frames: torch.Tensor, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """(T, 3, H, W) with min(H, W) >= size -> (T, 3, size, size), random (train) or centre crop."""
    h, w = frames.shape[-2:]
    top = rng.randint(0, h - size) if train else (h - size) // 2
    left = rng.randint(0, w - size) if train else (w - size) // 2
    return frames[..., top:top + size, left:left + size]


def frame_indices(n_frames: int, native_fps: float, t: int, fps: Optional[float], window_seconds: Optional[float],
                  train: bool, rng: random.Random, aug: Any = None) -> list:
    """Which `t` frames to decode (data.video: at `fps` within `window_seconds`, or spread over the clip; train
    with a VideoAugment `aug`: temporally jittered, `augment.temporal_indices`). Clips shorter than needed loop
    (indices wrap) rather than fail."""
    if train and aug is not None:
        return augment.temporal_indices(n_frames, native_fps, t, fps, window_seconds, aug, rng)
    if fps is None:
        return [min(n_frames - 1, int((i + 0.5) * n_frames / t)) for i in range(t)]
    step = max(native_fps / fps, 1e-6)
    span = (window_seconds or t / fps) * native_fps
    start_max = max(0.0, n_frames - span)
    start = rng.uniform(0, start_max) if train else start_max / 2
    return [int(start + i * step) % n_frames for i in range(t)]


def video_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the container headers (PyAV), without decoding a frame."""
    import av

    nonempty(data, "video")
    try:
        with av.open(io.BytesIO(data)) as container:
            ctx = container.streams.video[0].codec_context
            if not ctx.width or not ctx.height:
                raise ValueError("video stream has no size")
            return ctx.width, ctx.height
    except (IndexError, ValueError, av.error.FFmpegError) as e:
        raise BadSample("undecodable", f"video: {e or 'no video stream'}") from None


def decode_video(data: bytes, settings: DecodeSettings, train: bool, rng: random.Random) -> torch.Tensor:
    """(T, 3, size, size) uint8 frames (normalised by the model, on the device). decord scales while decoding
    (shorter side to `size`, aspect kept: decord rejects other shapes), then one crop for all frames (train: one
    augmentation)."""
    return decode_video_timed(data, settings, train, rng)[0]


def decode_video_timed(data: bytes, settings: DecodeSettings, train: bool, rng: random.Random) -> tuple:
    """decode_video's frames and the (start, end) seconds of the clip they cover: a sound track decoded for the
    same sample takes its window there (VATT's aligned video-audio positives)."""
    size = settings.image_size
    w, h = video_size(data)
    scale = size / min(h, w)
    target = (max(size, round(w * scale)), max(size, round(h * scale)))
    try:
        frames, span = _frames(data, target if target != (w, h) else None, settings, train, rng)
    except BadSample:
        if target == (w, h):
            raise
        # decord 0.6's scaler fails on some output sizes (64 px to 16, 24 or 48 px: "from_size == to_size"):
        # decode at the native size and resize below. The draw is redone with the same RNG state.
        frames, span = _frames(data, None, settings, train, rng)
    if tuple(frames.shape[-2:]) != target[::-1]:  # decord rounded a side, or decoded at the native size
        frames = F.interpolate(frames.float(), size=target[::-1], mode="bilinear", antialias=True)
        frames = frames.round_().clamp_(0, 255).to(torch.uint8)
    if train:
        return augment.video_frames(frames, size, settings.augment.video, rng), span
    return _crop(frames, size, train, rng), span


def probe_video(data: bytes) -> dict:
    """Metadata, after reading the size from the headers as training does and decoding PROBE_FRAMES frames
    spread over the clip (at native size)."""
    video_size(data)
    vr = _video_reader(data)
    fps = vr.get_avg_fps() or 0.0
    idx = frame_indices(len(vr), fps or 25.0, PROBE_FRAMES, None, None, False, random.Random(0))
    try:
        h, w = vr.get_batch(idx).shape[1:3]
    except Exception as e:
        raise BadSample("undecodable", f"video frames: {e}") from None
    return {"frames": len(vr), "fps": fps, "duration": len(vr) / fps if fps else 0.0, "width": w, "height": h}


ENTRY = register(Modality(
    "video", ("mp4", "webm", "mkv", "avi", "mov"), decode_video, probe_video,
    stem=lambda c: PatchStem(c.width, 3, (c.video.tubelet, c.patch_size, c.patch_size),
                             (c.video.num_frames // c.video.tubelet, grid(c), grid(c)),
                             c.drop_token.get("video", 0.0), c.stem),
    tokens=_tokens,
    stem_input=lambda x, repeat: x.permute(0, 2, 1, 3, 4),  # (B, T, 3, H, W) -> (B, 3, T, H, W)
    to_float=pixels_to_float,
    sample_shape=lambda d: (d.video.num_frames, 3, d.image_size, d.image_size), sample_dtype=torch.uint8,
    timed=decode_video_timed,
    inputs_per_token=lambda c: 3 * c.video.tubelet * c.patch_size ** 2,
    templates=("a video of {}.", "a video of a person {}.", "a clip of {}."),
    data_config=VideoConfig, model_config=VideoStemConfig, augment_config=VideoAugment,
    task_terms={"num_frames": ("data.video.num_frames", Optional[int])},
    rules=_rules, augment_rules=_augment_rules,
    positive=("data.video.num_frames", "data.video.fps", "data.video.window_seconds", "model.video.num_frames",
              "model.video.tubelet")))
