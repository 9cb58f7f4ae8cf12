"""Real background noise for audio augmentation (`data.augment.audio.noise_files`, see `mmpt.data.augment`).

`noise_files` is a folder of audio files (searched recursively; e.g. MUSAN's noise/ or a DEMAND folder) or
webdataset shards (a shard pattern: a directory with sizes.json, a brace pattern or a glob of local tars), whose
audio members are the noise. Recordings are listed once per process (by offset inside a tar, so a pick reads
one member) and decoded with the training decoder's `load_waveform` (mono, resampled); the last
`MAX_DECODED` decoded recordings stay in memory per worker. Which recording and which part of it a sample
gets is drawn from the sample's RNG, so real noise is as reproducible as the synthetic kinds.
"""
from __future__ import annotations

import functools
import os
import random
import tarfile
from pathlib import Path

import torch

from mmpt import modality
from mmpt.data.samples import BadSample, load_waveform
from mmpt.data.shards import SIZES_FILE, list_shards
from mmpt.errors import DataError

MAX_DECODED = 16  # decoded recordings kept per process
KEY = "data.augment.audio.noise_files"


def _suffixes() -> set:
    return {f".{ext}" for ext in modality.get("audio").extensions}


def list_noise(path: str) -> list:
    """(file, offset, size) of every noise recording; offset -1: a whole file."""
    suffixes = _suffixes()
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, SIZES_FILE)):
        files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        items = [(str(p), -1, -1) for p in files]
    else:
        try:
            urls = list_shards(path)
        except DataError as e:
            raise DataError(f"{KEY}: {e}") from None
        items = []
        for url in urls:
            if "://" in url or url.startswith("pipe:"):
                raise DataError(f"{KEY}='{path}': noise shards must be local files, not {url}")
            with tarfile.open(url) as tar:
                items += [(url, m.offset_data, m.size) for m in tar
                          if m.isfile() and Path(m.name).suffix.lower() in suffixes]
    if not items:
        raise DataError(f"{KEY}='{path}': no audio files ({', '.join(sorted(suffixes))}) found there")
    return items


@functools.lru_cache(maxsize=MAX_DECODED)
def _decoded(item: tuple, sample_rate: int) -> torch.Tensor:
    """(1, L) mono waveform of one recording at sample_rate."""
    import torchaudio

    file, offset, size = item
    with open(file, "rb") as f:
        if offset >= 0:
            f.seek(offset)
        data = f.read(size)
    try:
        wav, sr = load_waveform(data)
    except BadSample as e:
        where = f"{file} at byte {offset}" if offset >= 0 else file
        raise DataError(f"{KEY}: noise recording {where}: {e}; remove it from the noise files") from None
    wav = wav.mean(0, keepdim=True)
    return torchaudio.functional.resample(wav, sr, sample_rate) if sr != sample_rate else wav


class NoiseBank:
    def __init__(self, path: str):
        self.path, self.items = path, list_noise(path)

    def clip(self, n: int, sample_rate: int, rng: random.Random) -> torch.Tensor:
        """(1, n): a random part of a random recording (a short one loops)."""
        wav = _decoded(self.items[rng.randrange(len(self.items))], sample_rate)
        if wav.size(1) < n:
            wav = wav.repeat(1, -(-n // wav.size(1)))
        start = rng.randint(0, wav.size(1) - n)
        return wav[:, start:start + n]


@functools.cache
def noise_bank(path: str) -> NoiseBank:
    """The noise of `path`, listed once per process."""
    return NoiseBank(path)
