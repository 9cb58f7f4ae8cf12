"""Real decoders for each media type: PIL (image), decord (video), torchaudio via torchcodec (audio), the
tokenizer (text). The modality registry (`mmpt.modality`) says which decoder serves which modality.

Every decoder is `decode_X(data: bytes, settings: DecodeSettings, train: bool, rng) -> tensor` and raises
`BadSample(reason)` for input it cannot use. In training (`train=True`) it augments as `settings.augment` says
(`mmpt.data.augment`), drawing only from `rng`; eval decoding is deterministic (centre crops and windows).
`probe_X(data) -> {stat: number}` checks that a file decodes and returns its metadata (for `mmpt shards build`,
which refuses what fails, and `mmpt shards check`).
"""
from __future__ import annotations

import dataclasses
import io
import random
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mmpt.config import Config, config_class
from mmpt.data import augment
from mmpt.data.samples import BadSample, load_waveform, nonempty
from mmpt.data.tokenizer import get_tokenizer
from mmpt.modality import CLIP_MEAN, CLIP_STD, MODALITIES

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: refuse, don't allocate
MAX_VIDEO_FRAMES = 100_000
PROBE_FRAMES = 4  # frames a video probe decodes, spread over the clip (a truncated file fails here)
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
        self.augment = augment if augment is not None else config_class()().data.augment
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


# ---- image ------------------------------------------------------------------------------------------

def open_image(data: bytes, target: Optional[int] = None) -> Image.Image:
    nonempty(data, "image")
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


def image_to_tensor(img: Image.Image, size: int, train: bool, rng: random.Random, aug: Any = None) -> torch.Tensor:
    """Eval: the centre square of the shorter side. Train: the crop the image augmentation `aug` draws (an
    ImageAugment, mmpt.modalities.image), then its flip / RandAugment / colour jitter. Resized to `size` once:
    (3, size, size) uint8 (the model normalises on the device: mmpt.modalities.image.pixels_to_float)."""
    w, h = img.size
    if train:
        left, top, cw, ch = augment.crop_box(w, h, aug, rng)
    else:
        side = min(w, h)
        left, top, cw, ch = (w - side) // 2, (h - side) // 2, side, side
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch), reducing_gap=2.0)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return augment.pixel_ops(x, aug, rng) if train else x


def decode_image(data: bytes, settings: DecodeSettings, train: bool, rng: random.Random) -> torch.Tensor:
    target = settings.image_size if settings.jpeg_draft else None
    return image_to_tensor(open_image(data, target=target), settings.image_size, train, rng, settings.augment.image)


def probe_image(data: bytes) -> dict:
    img = open_image(data)
    return {"width": img.width, "height": img.height}


# ---- video ------------------------------------------------------------------------------------------

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


# ---- audio ------------------------------------------------------------------------------------------

def decode_audio(data: bytes, settings: DecodeSettings, train: bool, rng: random.Random,
                 window: Optional[tuple] = None) -> torch.Tensor:
    """(1, frames, mel) float16 normalised Kaldi log-mel fbank of a mono, resampled, cropped/padded clip. With a
    `window` (seconds: the frames a video decoded for the same sample) the clip's n samples are centred on it, in
    training too. Train: a random window, augmented as settings.augment.audio says (speed, noise, gain, pitch warp,
    SpecAugment masks); eval: the centre window."""
    import torchaudio

    aug, a = settings.augment.audio, settings.audio
    wav, sr = load_waveform(data)
    wav = wav.mean(0, keepdim=True)
    if sr != a.sample_rate:
        wav = torchaudio.functional.resample(wav, sr, a.sample_rate)
    n = int(a.seconds * a.sample_rate)
    # the video frames' span: the window centred on it, inside the clip; in training the n·f samples a speed
    # change f takes, so the sped-up crop is n real samples, not n / f and silence
    mid = None if window is None else (window[0] + window[1]) / 2 * a.sample_rate
    if mid is not None and not train:
        wav = augment.centred(wav, n, mid)
    if train:
        wav = augment.waveform(wav, n, a.sample_rate, aug, rng, mid)
    elif wav.size(1) >= n:
        start = (wav.size(1) - n) // 2
        wav = wav[:, start:start + n]
    else:
        wav = F.pad(wav, (0, n - wav.size(1)))
    fbank = torchaudio.compliance.kaldi.fbank(
        wav - wav.mean(), htk_compat=True, sample_frequency=a.sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=a.num_mel_bins, dither=0.0, frame_shift=10,
        vtln_warp=augment.pitch_warp(aug, rng) if train else 1.0)
    centre = fbank.mean(0, keepdim=True) if a.norm == "utterance" else a.norm_mean
    fbank = (fbank - centre) / (2 * a.norm_std)
    fbank = fbank[: a.fbank_frames]
    fbank = augment.spec_augment(fbank, aug, rng) if train else fbank
    return fbank[None].to(torch.float16)  # half the bytes through shared memory; normalised values stay ~1e-3 exact


def probe_audio(data: bytes) -> dict:
    wav, sr = load_waveform(data)
    return {"sample_rate": sr, "channels": wav.size(0), "duration": wav.size(-1) / sr}


# ---- text -------------------------------------------------------------------------------------------

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
