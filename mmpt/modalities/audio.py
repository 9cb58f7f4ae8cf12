"""Audio: FLAC/WAV/MP3/OGG/M4A (or a video's sound track) decoded by torchaudio into a Kaldi log-mel fbank, cut
into patch x patch tokens like a one-channel image.

Config: `data.audio` (resampling, clip length, fbank and its normalisation), `model.audio` (the patch and the fbank
size its position embedding is laid out for), `data.augment.audio` (waveform and fbank augmentation), and the task
term `data.tasks.<pair>.audio_seconds`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from mmpt.data import augment
from mmpt.data.media import DecodeSettings
from mmpt.data.noise import noise_bank
from mmpt.data.samples import load_waveform
from mmpt.modalities.image import interval
from mmpt.modality import Modality, register
from mmpt.model.stems import PatchStem

VTLN_MARGIN_HZ = 500.0  # Kaldi's vtln_high default: the warp's upper bend this far below the top filter edge
VTLN_LOW_HZ = 100.0  # Kaldi's vtln_low default


@dataclass
class AudioConfig:
    """How audio is decoded (data.audio): mono, resampled, cropped/padded, Kaldi log-mel fbank."""
    sample_rate: int = 16000
    seconds: float = 1.0
    num_mel_bins: int = 128
    norm_mean: float = -4.27  # AST/ImageBind AudioSet statistics of the log-mel fbank
    norm_std: float = 4.57
    # dataset: (fbank - norm_mean) / (2 norm_std), AST's. utterance: each mel bin's mean over the clip is
    # removed first (cepstral mean normalisation), which takes out a voice's or a channel's fixed spectral
    # envelope, then the same scale.
    norm: Literal["dataset", "utterance"] = "dataset"
    # The mel filterbank's upper edge in Hz (0: the Nyquist frequency). 4000 keeps to the band an 8 kHz or
    # telephone recording has, so speech learned at 16 kHz meets such recordings on the same filters.
    max_hz: float = 0.0

    @property
    def vtln_high(self) -> float:
        """Where the pitch warp's piecewise-linear map bends at the top: Kaldi's 500 Hz below the filterbank's
        upper edge (a negative value counts down from the Nyquist frequency). Kaldi refuses a warp whose bend
        lies above the edge, which the Nyquist-relative default would with max_hz set."""
        return self.max_hz - VTLN_MARGIN_HZ if self.max_hz else -VTLN_MARGIN_HZ

    @property
    def fbank_frames(self) -> int:
        """Kaldi fbank frames of the fixed-length clip: 25 ms windows every 10 ms, edges snipped."""
        n, win, hop = int(self.seconds * self.sample_rate), int(0.025 * self.sample_rate), int(0.01 * self.sample_rate)
        return 1 + (n - win) // hop


@dataclass
class AudioStemConfig:
    """The audio stem (model.audio): the log-mel spectrogram as a one-channel image cut in patch x patch."""
    fbank_frames: int = 98  # fbank frames the position embedding is laid out for (other durations interpolate)
    num_mel_bins: int = 128  # mel bins it is laid out for
    patch: int = 16


@dataclass
class AudioAugment:
    """Training augmentation of audio (data.augment.audio): waveform (speed, noise, gain), then fbank (pitch
    warp, SpecAugment masks). Each is off at its neutral value, noted on the right. See mmpt.data.augment."""
    speed: list[float] = field(default_factory=lambda: [0.9, 1.1])  # factor, resampled in 0.01 steps; [1, 1]
    noise_p: float = 0.5  # probability of mixing background noise; 0
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 40.0])  # signal-to-noise ratio drawn
    noise_colors: list[Literal["white", "pink", "brown"]] = field(default_factory=lambda: ["white", "pink", "brown"])
    noise_files: Optional[str] = None  # real noise too: a folder of audio files, or a shard pattern of audio
    gain_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])  # [0, 0]
    pitch_semitones: list[float] = field(default_factory=lambda: [-1.0, 1.0])  # fbank frequency warp; [0, 0]
    freq_masks: int = 1  # SpecAugment: masks of U{0..width} mel bins; 0
    freq_mask_width: int = 24
    time_masks: int = 2  # ... and of U{0..width} frames (10 ms each); 0
    time_mask_width: int = 20

    @classmethod
    def minimal(cls):
        """The least a training sample gets (`augment: false`): a random window of the clip, nothing else."""
        return cls(speed=[1.0, 1.0], noise_p=0.0, gain_db=[0.0, 0.0], pitch_semitones=[0.0, 0.0], freq_masks=0,
                   time_masks=0)


def _augment_rules(p: str, a: AudioAugment) -> list:
    rules = [interval(f"{p}.speed", a.speed, 0.5, 2.0),
             interval(f"{p}.pitch_semitones", a.pitch_semitones, -6.0, 6.0),
             interval(f"{p}.gain_db", a.gain_db, -60.0, 60.0),
             interval(f"{p}.noise_snr_db", a.noise_snr_db, -30.0, 100.0),
             (f"{p}.noise_p", a.noise_p, 0 <= a.noise_p <= 1, "must be a probability in [0, 1]"),
             (f"{p}.noise_colors", a.noise_colors, not a.noise_p or bool(a.noise_colors or a.noise_files),
              "is empty and noise_files unset: no noise to mix at noise_p > 0")]
    return rules + [(f"{p}.{k}", getattr(a, k), getattr(a, k) >= 0, "must be >= 0")
                    for k in ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width")]


def _power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def _rules(cfg) -> list:
    d, m = cfg.data, cfg.model
    used = "audio" in m.modalities
    fbank = min(d.audio.num_mel_bins, d.audio.fbank_frames)
    # A stem's patch larger than what the decoder gives it would fail at the first batch, not here.
    return [("data.audio.seconds", d.audio.seconds, d.audio.fbank_frames >= 1, "shorter than one 25 ms fbank window"),
            ("data.audio.max_hz", d.audio.max_hz,
             d.audio.max_hz == 0 or VTLN_LOW_HZ + VTLN_MARGIN_HZ < d.audio.max_hz <= d.audio.sample_rate / 2,
             f"must be 0 (the Nyquist frequency of data.audio.sample_rate) or in "
             f"({VTLN_LOW_HZ + VTLN_MARGIN_HZ:g}, {d.audio.sample_rate / 2:g}]: the pitch warp bends "
             f"{VTLN_LOW_HZ:g} Hz above the bottom and {VTLN_MARGIN_HZ:g} Hz below the top"),
            ("model.audio.patch", m.audio.patch, not used or m.audio.patch <= fbank,
             f"larger than data.audio's fbank ({d.audio.num_mel_bins} mel bins x {d.audio.fbank_frames} frames)"),
            ("model.audio.patch", m.audio.patch, m.stem != "conv" or not used or _power_of_two(m.audio.patch),
             "must be a power of two >= 2 with model.stem=conv (one stride-2 convolution per halving)")]


def _prepare(aug: AudioAugment) -> None:
    if aug.noise_files and aug.noise_p:
        noise_bank(aug.noise_files)


def _grid(cfg) -> tuple[int, int]:
    return cfg.audio.fbank_frames // cfg.audio.patch, cfg.audio.num_mel_bins // cfg.audio.patch


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
        window_type="hanning", num_mel_bins=a.num_mel_bins, dither=0.0, frame_shift=10, high_freq=a.max_hz,
        vtln_low=VTLN_LOW_HZ, vtln_high=a.vtln_high, vtln_warp=augment.pitch_warp(aug, rng) if train else 1.0)
    centre = fbank.mean(0, keepdim=True) if a.norm == "utterance" else a.norm_mean
    fbank = (fbank - centre) / (2 * a.norm_std)
    fbank = fbank[: a.fbank_frames]
    fbank = augment.spec_augment(fbank, aug, rng) if train else fbank
    return fbank[None].to(torch.float16)  # half the bytes through shared memory; normalised values stay ~1e-3 exact


def probe_audio(data: bytes) -> dict:
    wav, sr = load_waveform(data)
    return {"sample_rate": sr, "channels": wav.size(0), "duration": wav.size(-1) / sr}


ENTRY = register(Modality(
    "audio", ("flac", "wav", "mp3", "ogg", "m4a"), decode_audio, probe_audio,
    stem=lambda c: PatchStem(c.width, 1, (1, c.audio.patch, c.audio.patch), (1, *_grid(c)),
                             c.drop_token.get("audio", 0.0), c.stem),
    tokens=lambda c: _grid(c)[0] * _grid(c)[1],
    stem_input=lambda x, repeat: x.unsqueeze(2),  # (B, 1, F, M) spectrogram -> one-frame volume
    sample_shape=lambda d: (1, d.audio.fbank_frames, d.audio.num_mel_bins), sample_dtype=torch.float16,
    in_window=decode_audio,
    inputs_per_token=lambda c: c.audio.patch ** 2,
    templates=("the sound of {}.", "a sound of a {}.", "a recording of {}."),
    carried_by="video",
    data_config=AudioConfig, model_config=AudioStemConfig, augment_config=AudioAugment,
    task_terms={"audio_seconds": ("data.audio.seconds", Optional[float])},
    rules=_rules, augment_rules=_augment_rules, prepare=_prepare,
    positive=("data.audio.sample_rate", "data.audio.seconds", "data.audio.num_mel_bins", "data.audio.norm_std",
              "model.audio.fbank_frames", "model.audio.num_mel_bins", "model.audio.patch")))
