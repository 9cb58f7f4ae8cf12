"""Video-audio positives are aligned in time (VATT): the sound track is cut where the decoded frames are."""
import dataclasses
import random

import torch

from mmpt.config import augment_class
from mmpt.data.decode import SampleDecoder
from mmpt.data.media import DecodeSettings
from mmpt.modalities.audio import AudioAugment, AudioConfig, decode_audio
from mmpt.modalities.image import ImageAugment
from mmpt.modalities.video import VideoAugment, VideoConfig
from tests.media_files import ffmpeg


def marked_clip(path) -> bytes:
    """4 s at 10 fps whose frames are white and whose sound track holds a 1 kHz tone during [2, 3) s only."""
    ffmpeg("-f", "lavfi", "-i", "color=c=black:s=32x32:d=4:r=10,drawbox=x=0:y=0:w=32:h=32:color=white:t=fill:"
           "enable='between(t,2,2.999)'",
           "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=16000:duration=4,volume=volume=0:"
           "enable='lt(t,2)+gte(t,3)'",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path))
    return path.read_bytes()


def spec() -> DecodeSettings:
    # half a second of both: 5 frames at 10 fps from a random start, 0.5 s of sound
    return DecodeSettings(32, video=VideoConfig(num_frames=5, fps=10.0), audio=AudioConfig(seconds=0.5),
                      augment=augment_class().minimal())


def shares(frames: torch.Tensor, fbank: torch.Tensor) -> tuple[float, float]:
    """Share of white frames, share of fbank frames carrying the tone (silence sits at the normalised log of
    Kaldi's floor, about -1.3 in every bin; the tone lifts its bins to about +0.8)."""
    white = (frames.float().mean(dim=(1, 2, 3)) > 128).float().mean().item()
    loud = (fbank[0].float().max(dim=1).values > 0).float().mean().item()
    return white, loud


def test_sound_track_is_cut_where_the_frames_are(tmp_path):
    data = marked_clip(tmp_path / "marked.mp4")
    decoder = SampleDecoder(["audio", "video"], spec(), train=True)  # any order: the carrier decodes first
    seen, unaligned_misses = [], 0
    for seed in range(24):
        out = decoder({"mp4": data, "__seed__": seed, "__key__": str(seed)})
        white, loud = shares(out["video"], out["audio"])
        assert abs(white - loud) <= 0.3, (seed, white, loud)
        seen.append(white)
        # the same sound decoded on its own takes a random window: it disagrees with the frames somewhere
        alone = decode_audio(data, spec(), True, random.Random(seed + 1000))
        unaligned_misses += abs(white - shares(out["video"], alone)[1]) > 0.3
    assert min(seen) == 0.0 and max(seen) == 1.0  # windows in the silence and in the tone both came up
    assert unaligned_misses > 0


def test_eval_windows_are_centred_on_the_frames(tmp_path):
    data = marked_clip(tmp_path / "marked.mp4")
    out = SampleDecoder(["video", "audio"], spec(), train=False)({"mp4": data, "__key__": "x"})
    white, loud = shares(out["video"], out["audio"])
    assert abs(white - loud) <= 0.3


def test_sped_up_aligned_crop_is_real_sound_to_its_end(tmp_path):
    """Speed 1.1 takes 1.1 x the window's samples around the frames and resamples them to the window's length: a
    tone that lasts the whole clip is loud in every fbank frame (a crop of the window's own length sped up ends in
    ~9 % silence: the last fbank frames at the silence floor)."""
    path = tmp_path / "tone.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=white:s=32x32:d=4:r=10",
           "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=16000:duration=4",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path))
    audio = dataclasses.replace(AudioAugment.minimal(), speed=[1.1, 1.1])
    fast = spec().replace(augment=augment_class()(ImageAugment.minimal(), VideoAugment.minimal(), audio))
    decoder = SampleDecoder(["video", "audio"], fast, train=True)
    for seed in range(6):  # windows anywhere in the clip, the last ones shifted to stay inside it
        fbank = decoder({"mp4": path.read_bytes(), "__seed__": seed, "__key__": str(seed)})["audio"][0].float()
        loudest = fbank.max(dim=1).values
        assert (loudest > 0).all(), (seed, loudest.tolist())
