"""Training augmentation per modality, every random draw from the sample's own `random.Random`.

The stream seeds that RNG per sample from (seed, rank, worker, counter) (`mmpt.data.resumable`), so an
augmentation is a pure function of the sample's place in the stream and a resumed run reproduces it bit for
bit. torchvision's random transforms draw from torch's global RNG; they run here inside
`torch.random.fork_rng` after seeding torch from the sample's RNG (`torch_seeded`), which leaves the global RNG
(dropout, DropToken) as it was. The settings are `ImageAugment` (mmpt.modalities.image) / `VideoAugment` /
`AudioAugment`; each step is skipped at its neutral value and then draws nothing, so a step switched off
leaves every other draw of the stream unchanged (the sections' minimal(): random crop or window only). Recipes:

- Images: RandomResizedCrop (Szegedy et al. 2015; torchvision's parameter draw: an area fraction and a
  log-uniform aspect ratio, 10 tries, then a centre crop), cut from the decoded PIL image and resized once;
  then a horizontal flip (off by default: digits and text are not mirror symmetric), RandAugment (Cubuk et
  al. 2020, torchvision's 14 ops and 31 magnitude bins; opt-in) and colour jitter applied with probability
  jitter_p (SimCLR's RandomApply(ColorJitter), p = 0.8) on the uint8 crop.
- Video: the same draw of those image steps for every frame of a clip (one crop box, one flip, one
  RandAugment op sequence, one set of jitter factors: a clip stays one coherent scene), and temporal jitter of
  the sampled frames (a random start and stride, TSN/SlowFast style) in `temporal_indices`.
- Audio, AST/Kaldi conventions (16 kHz mono, 25 ms / 10 ms Kaldi fbank, AudioSet normalisation): speed
  perturbation (Ko et al. 2015: resampling, tempo and pitch together, factors quantised to 0.01 so the
  polyphase resampler stays small), background noise at a random SNR (coloured noise drawn from the RNG, or
  clips of real recordings, `mmpt.data.noise`), random gain, a pitch perturbation as a warp of the fbank's
  frequency axis (Kaldi's VTLN warp, as VTLP: Jaitly & Hinton 2013: free, where torchaudio's phase-vocoder
  pitch_shift takes seconds per clip on one core) and SpecAugment's frequency and time masks (Park et al.
  2019; no time warping, the least useful of its three parts) on the normalised fbank, filled with 0: the
  AudioSet mean log-energy after normalisation (AST fills the raw fbank with 0, loud after normalisation).
"""
from __future__ import annotations

import contextlib
import functools
import random
from typing import Optional

import torch
import torch.nn.functional as F

from mmpt.data.noise import noise_bank

MILD_SCALE = (0.8, 1.0)  # crop "mild": a square of the shorter side x sqrt(U(0.8, 1)): framing kept, scale varied


@contextlib.contextmanager
def torch_seeded(rng: random.Random):
    """torch's CPU RNG seeded from `rng` inside, restored after: torchvision's draws follow the sample."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU generator alone: all fork_rng restores
        yield


def uniform(rng: random.Random, bounds) -> float:
    """U(lo, hi); a fixed value (lo == hi) draws nothing, so a step at its neutral value leaves the stream as it
    was."""
    lo, hi = bounds
    return float(lo) if lo == hi else rng.uniform(lo, hi)


# ---- images and video frames ------------------------------------------------------------------------

def crop_box(width: int, height: int, aug, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of an image's training crop."""
    if aug.crop == "resized":
        from torchvision.transforms import RandomResizedCrop

        with torch_seeded(rng):
            top, left, h, w = RandomResizedCrop.get_params(torch.empty(0, height, width), aug.scale, aug.ratio)
        return left, top, w, h
    side = min(width, height)
    if aug.crop == "center":
        return (width - side) // 2, (height - side) // 2, side, side
    side = max(1, int(side * rng.uniform(*MILD_SCALE) ** 0.5))
    return rng.randint(0, width - side), rng.randint(0, height - side), side, side


@functools.lru_cache(maxsize=16)
def _jitter(brightness: float, contrast: float, saturation: float, hue: float):
    from torchvision.transforms import v2

    return v2.ColorJitter(brightness, contrast, saturation, hue)


@functools.lru_cache(maxsize=16)
def _randaugment(num_ops: int, magnitude: int):
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops, magnitude)


def pixel_ops(x: torch.Tensor, aug, rng: random.Random) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> flipped, RandAugment-ed, colour-jittered, with ONE draw of the parameters for the
    whole tensor (a video's frames change alike)."""
    if aug.flip_p and rng.random() < aug.flip_p:
        x = x.flip(-1)
    jitter = (aug.brightness, aug.contrast, aug.saturation, aug.hue)
    jitter_on = any(jitter) and bool(aug.jitter_p) and rng.random() < aug.jitter_p
    if aug.randaugment_ops or jitter_on:
        with torch_seeded(rng):
            if aug.randaugment_ops:
                x = _randaugment(aug.randaugment_ops, aug.randaugment_magnitude)(x)
            if jitter_on:
                x = _jitter(*jitter)(x)
    return x


def video_frames(frames: torch.Tensor, size: int, aug, rng: random.Random) -> torch.Tensor:
    """(T, 3, H, W) uint8 with min(H, W) >= size -> (T, 3, size, size) uint8, one augmentation for all frames."""
    h, w = frames.shape[-2:]
    if aug.crop == "mild":  # the random size x size window of before
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
        frames = frames[..., top:top + size, left:left + size]
    else:
        from torchvision.transforms.v2 import functional as TF

        left, top, cw, ch = crop_box(w, h, aug, rng)
        frames = TF.resized_crop(frames, top, left, ch, cw, [size, size], antialias=True)
    return pixel_ops(frames, aug, rng)


def temporal_indices(n_frames: int, native_fps: float, num_frames: int, fps: Optional[float],
                     window_seconds: Optional[float], aug, rng: random.Random) -> list:
    """Training frame indices with temporal jitter: the stride x f, f ~ U(stride_scale), at a random start.
    Spread over the clip (fps None): T frames over a random f-long part of it (f capped at 1). At `fps`: frames
    f / fps seconds apart from a random start in the clip (a window of window_seconds or the frames' span).
    At stride_scale [1, 1] these are the indices of before. Short clips loop (indices wrap)."""
    f = uniform(rng, aug.stride_scale)
    if fps is None:
        span = n_frames * min(f, 1.0)
        start = uniform(rng, (0.0, n_frames - span))
        return [min(n_frames - 1, int(start + (i + 0.5) * span / num_frames)) for i in range(num_frames)]
    step = max(native_fps / fps, 1e-6)
    span = (window_seconds or num_frames / fps) * native_fps
    span = max(span, num_frames * step * f) if f > 1 else span  # a faster stride may outgrow the window
    start = rng.uniform(0, max(0.0, n_frames - span))
    return [int(start + i * step * f) % n_frames for i in range(num_frames)]


# ---- audio ------------------------------------------------------------------------------------------

def _fit(wav: torch.Tensor, n: int) -> torch.Tensor:
    return wav[:, :n] if wav.size(1) >= n else F.pad(wav, (0, n - wav.size(1)))


def audio_window(wav: torch.Tensor, n: int, aug, rng: random.Random,
                 centre: Optional[float] = None) -> torch.Tensor:
    """(1, L) -> (1, n): a random window (at `centre`: the one centred on that sample, a video's frames), speed-
    perturbed by f (its n·f samples resampled to n: faster and higher at f > 1). At speed [1, 1]: the random window
    of before (short clips padded)."""
    f = round(uniform(rng, aug.speed), 2)
    m = max(1, round(n * f))
    if centre is not None:
        wav = centred(wav, m, centre)
    elif wav.size(1) >= m:
        start = rng.randint(0, wav.size(1) - m)
        wav = wav[:, start:start + m]
    if f != 1.0:
        wav = _resampler(round(f * 100))(wav)
    return _fit(wav, n)


def centred(wav: torch.Tensor, n: int, centre: float) -> torch.Tensor:
    """(1, L) -> (1, min(L, n)): the n samples centred at sample `centre`, shifted to stay inside the clip."""
    if wav.size(1) <= n:
        return wav
    start = min(max(0, round(centre - n / 2)), wav.size(1) - n)
    return wav[:, start:start + n]


@functools.lru_cache(maxsize=256)
def _resampler(orig: int):
    """torchaudio's polyphase resampler orig -> 100, its sinc kernel built once per factor and process."""
    import torchaudio

    return torchaudio.transforms.Resample(orig, 100)


def coloured_noise(colour: str, n: int, rng: random.Random) -> torch.Tensor:
    """(1, n) white, pink (power ~ 1/f) or brown (1/f^2) noise, shaped in the frequency domain, from `rng`."""
    white = torch.randn(n, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    if colour == "white":
        return white[None]
    return torch.fft.irfft(torch.fft.rfft(white) * _shape(colour, n), n)[None]


@functools.lru_cache(maxsize=8)
def _shape(colour: str, n: int) -> torch.Tensor:
    """Amplitude weights of the rfft bins: 1/sqrt(f) (pink) or 1/f (brown), 0 at DC (no offset)."""
    freqs = torch.arange(n // 2 + 1, dtype=torch.float32).clamp(min=1.0)
    weights = freqs ** -(0.5 if colour == "pink" else 1.0)
    weights[0] = 0.0
    return weights


def add_noise(wav: torch.Tensor, sample_rate: int, aug, rng: random.Random) -> torch.Tensor:
    """With probability noise_p: noise of a random kind (a colour, or "file": real noise from noise_files)
    scaled to an SNR ~ U(noise_snr_db) against the clip's power (a silent clip stays silent)."""
    if not (aug.noise_p and rng.random() < aug.noise_p):
        return wav
    kinds = list(aug.noise_colors) + (["file"] if aug.noise_files else [])
    kind, snr = rng.choice(kinds), uniform(rng, aug.noise_snr_db)
    if kind == "file":
        noise = noise_bank(aug.noise_files).clip(wav.size(1), sample_rate, rng)
    else:
        noise = coloured_noise(kind, wav.size(1), rng)
    signal, power = wav.pow(2).mean(), noise.pow(2).mean()
    if signal == 0 or power == 0:
        return wav
    return wav + noise * torch.sqrt(signal / (power * 10 ** (snr / 10)))


def waveform(wav: torch.Tensor, n: int, sample_rate: int, aug, rng: random.Random,
             centre: Optional[float] = None) -> torch.Tensor:
    """(1, L) mono at sample_rate -> (1, n): window (centred on sample `centre` if given) + speed, noise, gain."""
    wav = add_noise(audio_window(wav, n, aug, rng, centre), sample_rate, aug, rng)
    gain = uniform(rng, aug.gain_db)
    return wav * 10 ** (gain / 20) if gain else wav


def pitch_warp(aug, rng: random.Random) -> float:
    """Kaldi's VTLN warp factor for a pitch shift of s ~ U(pitch_semitones): 2^(s/12) scales the frequency
    axis of the mel filterbank, so a partial at f lands where one at f·2^(s/12) would (harmonics and formants
    alike, tempo kept; piecewise linear near the band edges)."""
    return 2 ** (uniform(rng, aug.pitch_semitones) / 12)


def spec_augment(fbank: torch.Tensor, aug, rng: random.Random) -> torch.Tensor:
    """(frames, mel) -> the same with SpecAugment's masks: freq_masks bands of U{0..freq_mask_width} mel bins
    and time_masks spans of U{0..time_mask_width} frames, each at a uniform position, set to 0."""
    if not (aug.freq_masks or aug.time_masks):
        return fbank
    fbank = fbank.clone()
    for dim, count, widest in ((1, aug.freq_masks, aug.freq_mask_width), (0, aug.time_masks, aug.time_mask_width)):
        length = fbank.size(dim)
        for _ in range(count):
            width = rng.randint(0, min(widest, length))
            start = rng.randint(0, length - width)
            fbank.narrow(dim, start, width).zero_()
    return fbank

