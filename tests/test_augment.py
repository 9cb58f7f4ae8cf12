"""Training augmentation (mmpt.data.augment) on real files: each step is seeded by the sample's RNG (same seed,
same bits; other seeds, other outputs), really changes its input, leaves eval decoding alone, and a resumed
multi-task stream reproduces every augmented batch bit for bit."""
import io
import math
import random
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmpt.config import SourceConfig, augment_class, default_config, load_config, source_augment
from mmpt.data import augment
from mmpt.data.media import MEAN, STD, DecodeSettings
from mmpt.data.noise import noise_bank
from mmpt.data.shards import write_shards
from mmpt.data.stream import tasks_from_config, train_loader
from mmpt.data.tokenizer import get_tokenizer
from mmpt.errors import ConfigError
from mmpt.modalities import audio as _audio
from mmpt.modalities import image as _image
from mmpt.modalities import video as _video
from mmpt.modalities.audio import AudioAugment, AudioConfig
from mmpt.modalities.image import ImageAugment, pixels_to_float
from mmpt.modalities.video import VideoAugment, VideoConfig
from tests.media_files import make_video

SR = 16000


# The loaders' compact media (uint8 pixels, float16 fbank) as the model sees them after its on-device
# normalisation, so the checks below read in normalised units.
def decode_image(*args):
    return pixels_to_float(_image.decode_image(*args), torch.float32)


def decode_video(*args):
    return pixels_to_float(_video.decode_video(*args), torch.float32)


def decode_audio(*args):
    return _audio.decode_audio(*args).float()


DECODE = {"image": decode_image, "video": decode_video, "audio": decode_audio}
PLAIN = {"image": ImageAugment(crop="center", jitter_p=0.0), "audio": AudioAugment.minimal(),
         "video": VideoAugment(crop="center", jitter_p=0.0, stride_scale=[1.0, 1.0])}  # no random step at all


def only(modality: str, **fields) -> DecodeSettings:
    """A spec whose `modality` has no random step but `fields`."""
    aug = augment_class().minimal()
    setattr(aug, modality, type(PLAIN[modality])(**{**PLAIN[modality].__dict__, **fields}))
    return DecodeSettings(image_size=16, video=VideoConfig(num_frames=4), audio=AudioConfig(seconds=1.0), augment=aug)


def pattern_png(w: int = 48, h: int = 40) -> bytes:
    """Smooth, asymmetric content: crops, flips and colour changes all show."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 3.0) * (y > h // 3)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def tone(seconds: float = 1.0, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return (0.3 * torch.sin(2 * math.pi * hz * t) * (0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t)))[None]


def flac(wav: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav[0].numpy(), SR, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("augment")
    # 1 s at 16 kHz: exactly the window, so the window itself draws nothing random
    return {"image": pattern_png(), "audio": flac(tone()), "video": make_video(tmp / "c.mp4", seconds=2.0, fps=10)}


CASES = [  # (name, modality, the one step switched on)
    ("image_crop", "image", {"crop": "resized", "scale": [0.3, 0.7]}),
    ("image_flip", "image", {"flip_p": 0.5}),
    ("image_jitter", "image", {"jitter_p": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
    ("image_randaugment", "image", {"randaugment_ops": 2, "randaugment_magnitude": 15}),
    ("audio_specaugment", "audio", {"freq_masks": 2, "time_masks": 2}),
    ("audio_gain", "audio", {"gain_db": [-12.0, 12.0]}),
    ("audio_noise", "audio", {"noise_p": 1.0, "noise_snr_db": [0.0, 10.0]}),
    ("audio_speed", "audio", {"speed": [0.8, 1.2]}),
    ("audio_pitch", "audio", {"pitch_semitones": [-3.0, 3.0]}),
    ("video_temporal", "video", {"stride_scale": [0.4, 0.9]}),
    ("video_crop", "video", {"crop": "resized", "scale": [0.3, 0.7]}),
    ("video_pixels", "video", {"flip_p": 0.5, "jitter_p": 1.0, "randaugment_ops": 2}),
]


@pytest.mark.parametrize("name, modality, fields", CASES, ids=[c[0] for c in CASES])
def test_each_augmentation_is_seeded_changes_its_input_and_spares_eval(media, name, modality, fields):
    decode, data, spec, plain = DECODE[modality], media[modality], only(modality, **fields), only(modality)
    outs = [decode(data, spec, True, random.Random(seed)) for seed in range(6)]
    assert torch.equal(outs[0], decode(data, spec, True, random.Random(0)))  # same seed: same bits
    assert len({o.numpy().tobytes() for o in outs}) >= (2 if name == "image_flip" else 5)  # other seeds: others
    reference = decode(data, plain, True, random.Random(0))
    assert max((o - reference).abs().mean().item() for o in outs) > 0.02  # not a no-op
    evaluated = decode(data, spec, False, random.Random(3))
    assert torch.equal(evaluated, decode(data, only(modality), False, random.Random(0)))
    default = DecodeSettings(16, video=VideoConfig(num_frames=4))  # data.augment's defaults
    assert torch.equal(evaluated, decode(data, default, False, random.Random(1)))


def test_resized_crop_draws_area_and_aspect_in_range():
    aug = ImageAugment(scale=[0.3, 0.6], ratio=[0.5, 2.0])
    boxes = [augment.crop_box(200, 100, aug, random.Random(s)) for s in range(200)]
    areas = [w * h / (200 * 100) for _, _, w, h in boxes]
    ratios = [w / h for _, _, w, h in boxes]
    assert 0.29 <= min(areas) and max(areas) <= 0.61 and max(areas) - min(areas) > 0.2
    assert 0.45 <= min(ratios) and max(ratios) <= 2.1 and min(ratios) < 0.8 and max(ratios) > 1.5
    assert all(0 <= left <= 200 - w and 0 <= top <= 100 - h for left, top, w, h in boxes)
    assert len(set(boxes)) > 150


def test_flip_mirrors_and_jitter_keeps_the_picture(media):
    plain = decode_image(media["image"], only("image"), True, random.Random(0))
    flipped = decode_image(media["image"], only("image", flip_p=1.0), True, random.Random(0))
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    jittered = decode_image(media["image"], only("image", jitter_p=1.0, brightness=0.5, contrast=0.5), True,
                            random.Random(1))
    corr = torch.corrcoef(torch.stack([plain.flatten(), jittered.flatten()]))[0, 1]
    assert corr > 0.9 and (jittered - plain).abs().mean() > 0.02  # same picture, other colours


def test_the_off_switch_is_the_crop_mmpt_had_before(media):
    """augment_class().minimal(): a square of the shorter side x sqrt(U(0.8, 1)) at a random place, resized once."""
    img = Image.open(io.BytesIO(media["image"])).convert("RGB")
    for seed in range(3):
        rng = random.Random(seed)
        side = int(min(img.size) * rng.uniform(0.8, 1.0) ** 0.5)
        left, top = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
        crop = img.resize((16, 16), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=2.0)
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        least = DecodeSettings(16, augment=augment_class().minimal())
        got = decode_image(media["image"], least, True, random.Random(seed))
        torch.testing.assert_close(got, (expected - mean) / std, rtol=0, atol=1e-6)


def test_specaugment_masks_whole_bands_and_spans_with_zero(media):
    plain = decode_audio(media["audio"], only("audio"), True, random.Random(0))[0]
    masked = decode_audio(media["audio"], only("audio", freq_masks=2, freq_mask_width=20, time_masks=2,
                                               time_mask_width=15), True, random.Random(4))[0]
    changed = masked != plain
    assert changed.any() and (masked[changed] == 0).all()
    rows, cols = (masked == 0).all(1), (masked == 0).all(0)  # masked frames, masked mel bins
    assert torch.equal(changed, (rows[:, None] | cols[None, :]) & (plain != 0))
    assert 0 < rows.sum() <= 30 and 0 < cols.sum() <= 40


def test_gain_shifts_the_log_mel_by_its_decibels():
    hiss = flac(0.1 * torch.randn(1, SR, generator=torch.Generator().manual_seed(0)))  # energy in every mel bin
    plain = decode_audio(hiss, only("audio"), True, random.Random(0))
    louder = decode_audio(hiss, only("audio", gain_db=[6.0, 6.0]), True, random.Random(0))
    expected = 6 / 10 * math.log(10) / (2 * AudioConfig().norm_std)  # ln power shift, then AST's normalisation
    assert (louder - plain).median().item() == pytest.approx(expected, abs=1e-4)


def test_noise_is_mixed_at_the_drawn_snr_in_its_colour():
    wav = tone()
    for colour in ("white", "pink", "brown"):
        aug = AudioAugment(noise_p=1.0, noise_snr_db=[10.0, 10.0], noise_colors=[colour])
        noisy = augment.add_noise(wav, SR, aug, random.Random(0))
        noise = noisy - wav
        assert 10 * math.log10(wav.pow(2).mean() / noise.pow(2).mean()) == pytest.approx(10.0, abs=1e-3)
        power = torch.fft.rfft(noise[0]).abs().pow(2)
        low, high = power[20:400].mean(), power[4000:8000].mean()  # 10-200 Hz vs 2-4 kHz: 1, ~45, ~4000
        ratio = (low / high).item()
        assert {"white": 0.5 < ratio < 2, "pink": 25 < ratio < 80, "brown": ratio > 1000}[colour], (colour, ratio)
    assert torch.equal(augment.add_noise(wav * 0, SR, aug, random.Random(0)), wav * 0)  # silence stays silent


def test_real_noise_from_a_folder_and_from_shards(tmp_path):
    hum = tone(0.3, hz=50.0) * 3
    (tmp_path / "noise" / "sub").mkdir(parents=True)
    (tmp_path / "noise" / "sub" / "hum.flac").write_bytes(flac(hum))
    write_shards([{"__key__": "n0", "flac": flac(hum)}], tmp_path / "shards", "noise", 10)
    wav = tone()
    for where in (tmp_path / "noise", tmp_path / "shards"):
        aug = AudioAugment(noise_p=1.0, noise_snr_db=[5.0, 5.0], noise_colors=[], noise_files=str(where))
        noisy = augment.add_noise(wav, SR, aug, random.Random(2))
        assert torch.equal(noisy, augment.add_noise(wav, SR, aug, random.Random(2)))
        noise = noisy - wav
        assert 10 * math.log10(wav.pow(2).mean() / noise.pow(2).mean()) == pytest.approx(5.0, abs=1e-3)
        spectrum = torch.fft.rfft(noise[0]).abs()
        assert abs(spectrum.argmax().item() - 50) <= 1  # the 50 Hz hum (1 Hz bins), looped past its 0.3 s
    assert len(noise_bank(str(tmp_path / "shards")).items) == 1


def test_speed_and_pitch_move_a_tone_by_their_factor():
    fast = augment.audio_window(tone(2.0, hz=1000.0), SR, AudioAugment(speed=[1.1, 1.1]), random.Random(0))
    assert fast.shape == (1, SR) and torch.fft.rfft(fast[0]).abs().argmax().item() == pytest.approx(1100, abs=2)
    data = flac(tone(1.0, hz=1000.0))
    up = decode_audio(data, only("audio", pitch_semitones=[3.0, 3.0]), True, random.Random(0))[0]
    truly_higher = decode_audio(flac(tone(1.0, hz=1000.0 * 2 ** (3 / 12))), only("audio"), True, random.Random(0))[0]
    plain = decode_audio(data, only("audio"), True, random.Random(0))[0]
    peak = {k: v.mean(0).argmax().item() for k, v in {"up": up, "true": truly_higher, "plain": plain}.items()}
    assert abs(peak["up"] - peak["true"]) <= 1 and peak["up"] > peak["plain"] + 2  # where a real shift puts it


def test_temporal_jitter_picks_ordered_frames_of_a_random_part():
    aug = VideoAugment(stride_scale=[0.5, 1.0])
    spreads = [augment.temporal_indices(100, 25.0, 8, None, None, aug, random.Random(s)) for s in range(50)]
    assert all(idx == sorted(idx) and 0 <= idx[0] and idx[-1] <= 99 for idx in spreads)
    spans = [idx[-1] - idx[0] for idx in spreads]
    assert min(spans) < 50 and max(spans) > 80 and len({idx[0] for idx in spreads}) > 20
    fixed = augment.temporal_indices(100, 25.0, 8, None, None, VideoAugment(stride_scale=[1.0, 1.0]),
                                     random.Random(0))
    assert fixed == [min(99, int((i + 0.5) * 100 / 8)) for i in range(8)]  # [1, 1]: the frames of before
    at_fps = augment.temporal_indices(300, 30.0, 4, 5.0, None, VideoAugment(stride_scale=[0.5, 1.5]),
                                      random.Random(3))
    steps = {b - a for a, b in zip(at_fps, at_fps[1:], strict=False)}
    assert len(at_fps) == 4 and all(3 <= s <= 9 for s in steps)  # 6 native frames per step x 0.5..1.5


def test_every_frame_of_a_clip_gets_the_same_augmentation():
    aug = VideoAugment(crop="resized", flip_p=1.0, jitter_p=1.0, hue=0.1, randaugment_ops=2, randaugment_magnitude=12)
    picture = torch.from_numpy(np.array(Image.open(io.BytesIO(pattern_png(40, 32))))).permute(2, 0, 1)
    still = picture.expand(6, -1, -1, -1).contiguous()
    out = augment.video_frames(still, 16, aug, random.Random(5))
    assert out.shape == (6, 3, 16, 16) and all(torch.equal(out[0], out[t]) for t in range(6))
    moving = torch.stack([picture.roll(3 * t, dims=-1) for t in range(6)])
    together = augment.video_frames(moving, 16, aug, random.Random(7))
    alone = [augment.video_frames(moving[t:t + 1], 16, aug, random.Random(7))[0] for t in range(6)]
    assert all(torch.equal(together[t], alone[t]) for t in range(6))  # one draw, applied to each frame
    assert len({augment.video_frames(moving, 16, aug, random.Random(s)).numpy().tobytes() for s in range(4)}) == 4


def test_config_merges_a_sources_augment_field_by_field():
    cfg = load_config("demo", ["data.augment={}",  # the demo ships with augmentation off; {}: the defaults
                               "data.augment.audio.gain_db=[-3, 3]",
                               "data.sources.1.augment={audio: {noise_snr_db: [5, 30]}, image: false}",
                               "data.sources.0.augment=none"])
    speech = source_augment(cfg, 1)
    assert speech.audio.noise_snr_db == [5.0, 30.0] and speech.audio.gain_db == [-3.0, 3.0]  # the rest: data.augment
    assert speech.image == ImageAugment.minimal() and speech.video == cfg.data.augment.video
    assert source_augment(cfg, 0) == augment_class().minimal() and source_augment(cfg, 2) == cfg.data.augment
    assert load_config("demo", ["data.augment=false"]).data.augment == augment_class().minimal()
    for override, message in [
        ("data.augment.image.scale=[1.2, 0.5]", "data.augment.image.scale=[1.2, 0.5]: needs [min, max] with 0 < min"),
        ("data.sources.1.augment.audio.noise_p=1.5", "data.sources[1].augment.audio.noise_p=1.5: must be a probab"),
        ("data.sources.1.augment={audio: {snr: 3}}", "unknown key 'data.sources[1].augment.audio.snr'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("demo", [override])


def test_resumed_stream_reproduces_every_augmented_batch(tmp_path):
    """Three tasks (image, audio, video with text), augmentation on, one loader worker each: 5 steps, state,
    6 more; a fresh loader from the state gives the same 6 batches bit for bit."""
    picture, clip = pattern_png(), make_video(tmp_path / "c.mp4", seconds=1.5, fps=10)
    samples = {"image": [{"__key__": f"i{i}", "png": picture, "txt": f"picture {i}"} for i in range(24)],
               "audio": [{"__key__": f"a{i}", "flac": flac(tone(1.2, 200.0 + 50 * i)), "txt": f"tone {i}"}
                         for i in range(16)],
               "video": [{"__key__": f"v{i}", "mp4": clip, "txt": f"clip {i}"} for i in range(8)]}
    for name, rows in samples.items():
        write_shards(rows, tmp_path / name, name, 4)
    sources = [SourceConfig(m, str(tmp_path / m), [m, "text"]) for m in samples]
    sources[1].augment = {"audio": {"noise_snr_db": [0.0, 5.0], "noise_p": 1.0}}
    cfg = default_config()
    cfg.data.sources, cfg.model.modalities, cfg.model.image_size = sources, ["image", "video", "audio", "text"], 16
    cfg.data.batch_size, cfg.data.shuffle_buffer, cfg.data.shuffle_slots, cfg.data.num_workers = 2, 4, 2, 1
    cfg.data.video.num_frames, cfg.data.audio.seconds = 4, 1.0
    assert tasks_from_config(cfg)[0]["audio-text"].sources[0].augment.audio.noise_p == 1.0
    get_tokenizer(cfg.data.tokenizer, cfg.model.context_length)  # loaded once here (seconds), not in 9 workers

    def take(loader, n):
        return [next(loader) for _ in range(n)]

    first = train_loader(cfg, seed=3)
    take(first, 5)
    state, expected = first.state_dict(), take(first, 6)
    resumed = train_loader(cfg, seed=3)
    resumed.load_state_dict(state)
    got = take(resumed, 6)
    assert [name for name, _ in got] == [name for name, _ in expected] and len({n for n, _ in expected}) >= 2
    for (name, a), (_, b) in zip(got, expected, strict=True):
        assert a["__key__"] == b["__key__"]
        for m in name.split("-"):
            assert torch.equal(a[m], b[m]), (name, m)
    cfg.data.augment, cfg.data.sources[1].augment = augment_class().minimal(), False
    plain = train_loader(cfg, seed=3)
    take(plain, 5)
    for (name, a), (_, b) in zip(take(plain, 6), expected, strict=True):  # same samples, augmented differently
        assert a["__key__"] == b["__key__"] and not torch.equal(a[name.split("-")[0]], b[name.split("-")[0]])
