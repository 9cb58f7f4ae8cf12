"""Real decoders for each media type: PIL (image), decord (video), torchaudio via torchcodec (audio).

Each decoder takes encoded bytes and returns a tensor, raising `BadSample(reason)` for input it cannot use.
`probe_*` functions return metadata only (for `mmpt shards check` and the shard builder).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: refuse, don't allocate
MAX_VIDEO_FRAMES = 100_000
MAX_AUDIO_SECONDS = 3600.0
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "m4a")
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short stable tag used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _nonempty(data: bytes, kind: str) -> None:
    if not data:
        raise BadSample("zero_length", f"empty {kind}")


# ---- image ------------------------------------------------------------------------------------------

def open_image(data: bytes, target: Optional[int] = None) -> Image.Image:
    _nonempty(data, "image")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise BadSample("oversize", f"image {img.width}x{img.height}")
        if target and img.format == "JPEG":
            # DCT-domain downscaling: decode a 1/2, 1/4 or 1/8 size image that still covers the target.
            img.draft("RGB", (target, target))
        img = ImageOps.exif_transpose(img).convert("RGB")
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("undecodable", f"image: {e}") from None
    return img


def image_to_tensor(img: Image.Image, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """Shorter side to `size` (train: random crop scale 0.8-1.0), centre/random crop, CLIP normalisation."""
    w, h = img.size
    if train:
        scale = rng.uniform(0.8, 1.0)
        side = max(1, int(min(w, h) * scale ** 0.5))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=2.0)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return normalize(x.float().div_(255))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> CLIP-normalised."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def decode_image(data: bytes, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    return image_to_tensor(open_image(data, target=size), size, train, rng)


# ---- video ------------------------------------------------------------------------------------------

@dataclass
class VideoSpec:
    num_frames: int = 8
    size: int = 32
    fps: Optional[float] = None  # None: T frames uniformly over the clip; else frames at this rate ...
    window_seconds: Optional[float] = None  # ... from a random (train) or centred (eval) window of S seconds


def _video_reader(data: bytes, size: Optional[tuple] = None):
    import decord

    _nonempty(data, "video")
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


def _crop(frames: torch.Tensor, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """(T, 3, H, W) with min(H, W) >= size -> (T, 3, size, size), random (train) or centre crop."""
    h, w = frames.shape[-2:]
    top = rng.randint(0, h - size) if train else (h - size) // 2
    left = rng.randint(0, w - size) if train else (w - size) // 2
    return frames[..., top:top + size, left:left + size]


def frame_indices(n_frames: int, native_fps: float, spec: VideoSpec, train: bool, rng: random.Random) -> list:
    """Which frames to decode. Clips shorter than needed loop (indices wrap) rather than fail."""
    t = spec.num_frames
    if spec.fps is None:
        return [min(n_frames - 1, int((i + 0.5) * n_frames / t)) for i in range(t)]
    step = max(native_fps / spec.fps, 1e-6)
    span = (spec.window_seconds or t / spec.fps) * native_fps
    start_max = max(0.0, n_frames - span)
    start = rng.uniform(0, start_max) if train else start_max / 2
    return [int(start + i * step) % n_frames for i in range(t)]


def video_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the container headers (PyAV), without decoding a frame."""
    import av

    _nonempty(data, "video")
    try:
        with av.open(io.BytesIO(data)) as container:
            ctx = container.streams.video[0].codec_context
            if not ctx.width or not ctx.height:
                raise ValueError("video stream has no size")
            return ctx.width, ctx.height
    except (IndexError, ValueError, av.error.FFmpegError) as e:
        raise BadSample("undecodable", f"video: {e or 'no video stream'}") from None


def decode_video(data: bytes, spec: VideoSpec, train: bool, rng: random.Random) -> torch.Tensor:
    """(T, 3, size, size) CLIP-normalised frames. decord scales while decoding (shorter side to `size`,
    aspect kept: decord rejects other shapes), then one crop for all frames."""
    w, h = video_size(data)
    scale = spec.size / min(h, w)
    target = (max(spec.size, round(w * scale)), max(spec.size, round(h * scale)))
    try:
        vr = _video_reader(data, target if target != (w, h) else None)
        idx = frame_indices(len(vr), vr.get_avg_fps() or 25.0, spec, train, rng)
        frames = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("undecodable", f"video frames: {e}") from None
    if min(frames.shape[-2:]) < spec.size:  # decord rounded a side down: top up with a tiny resize
        frames = F.interpolate(frames.float(), size=target[::-1], mode="bilinear", antialias=True)
    return normalize(_crop(frames, spec.size, train, rng).float().div_(255))


def probe_video(data: bytes) -> dict:
    vr = _video_reader(data)
    fps = vr.get_avg_fps() or 0.0
    h, w = vr[0].shape[:2]
    return {"frames": len(vr), "fps": fps, "duration": len(vr) / fps if fps else 0.0, "width": w, "height": h}


# ---- audio ------------------------------------------------------------------------------------------

@dataclass
class AudioSpec:
    sample_rate: int = 16000
    seconds: float = 1.0
    num_mel_bins: int = 128
    norm_mean: float = -4.27  # AST/ImageBind AudioSet statistics of the log-mel fbank
    norm_std: float = 4.57

    @property
    def num_frames(self) -> int:
        """Kaldi fbank frames of the fixed-length clip: 25 ms windows every 10 ms, edges snipped."""
        n, win, hop = int(self.seconds * self.sample_rate), int(0.025 * self.sample_rate), int(0.01 * self.sample_rate)
        return 1 + (n - win) // hop


def load_waveform(data: bytes) -> tuple[torch.Tensor, int]:
    """Any container torchcodec reads (wav, flac, mp3, ogg, and the audio track of mp4/mkv/webm)."""
    import torchaudio

    _nonempty(data, "audio")
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


def decode_audio(data: bytes, spec: AudioSpec, train: bool, rng: random.Random) -> torch.Tensor:
    """(1, frames, mel) normalised Kaldi log-mel fbank of a mono, resampled, cropped/padded clip."""
    import torchaudio

    wav, sr = load_waveform(data)
    wav = wav.mean(0, keepdim=True)
    if sr != spec.sample_rate:
        wav = torchaudio.functional.resample(wav, sr, spec.sample_rate)
    n = int(spec.seconds * spec.sample_rate)
    if wav.size(1) >= n:
        start = rng.randint(0, wav.size(1) - n) if train else (wav.size(1) - n) // 2
        wav = wav[:, start:start + n]
    else:
        wav = F.pad(wav, (0, n - wav.size(1)))
    fbank = torchaudio.compliance.kaldi.fbank(
        wav - wav.mean(), htk_compat=True, sample_frequency=spec.sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=spec.num_mel_bins, dither=0.0, frame_shift=10)
    fbank = (fbank - spec.norm_mean) / (2 * spec.norm_std)
    return fbank[None, : spec.num_frames]


def probe_audio(data: bytes) -> dict:
    wav, sr = load_waveform(data)
    return {"sample_rate": sr, "channels": wav.size(0), "duration": wav.size(-1) / sr}
