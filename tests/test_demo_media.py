"""The demo's motion soundtracks: a voice saying digit and direction, centred on the clip's midpoint, so the
1-second audio window that video-audio centres on the video's frames hears all of it (it used to hear the tail
of a word spoken at 0 s, and only the digit: a video-audio R@1 ceiling of one clip in ten)."""
from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np

from mmpt.config import load_config
from mmpt.data.media import DecodeSettings
from mmpt.data.samples import load_waveform
from mmpt.modalities.video import decode_video_timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))
from demo_digits import write_part  # noqa: E402
from demo_media import SPEECH_RATE, motion_frames, soundtrack  # noqa: E402


def _members(part: Path) -> dict:
    out = {}
    for shard in sorted(part.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()})
    return out


def test_soundtrack_centres_and_squeezes_the_voiced_part():
    voice = np.r_[np.zeros(800), np.full(24000, 0.5), np.zeros(3000)].astype(np.float32)  # 1.5 s voiced
    track = soundtrack(voice, 2.0, 0.95)
    loud = np.nonzero(np.abs(track) > 0.02)[0]
    assert len(track) == 2 * SPEECH_RATE and track.dtype == np.float32
    assert (loud[-1] + 1 - loud[0]) == int(0.95 * SPEECH_RATE)
    assert abs((loud[0] + loud[-1]) / 2 - SPEECH_RATE) <= 1  # centred on 1.0 s


def test_motion_soundtracks_say_digit_and_direction_inside_the_centred_window(demo_data):
    members = _members(demo_data / "motion-val")
    clips = sorted(k for k in members if k.endswith(".mp4"))[:6]
    settings = DecodeSettings.from_config(load_config("demo"))
    for name in clips:
        wav, sr = load_waveform(members[name])
        loud = np.nonzero(np.abs(wav.mean(0).numpy()) > 0.02)[0] / sr
        _, (start, end) = decode_video_timed(members[name], settings, False, random.Random(0))
        mid = (start + end) / 2  # where video-audio centres the clip's 1-second audio window
        assert mid - 0.5 <= loud[0] and loud[-1] <= mid + 0.5, (name, mid, loud[0], loud[-1])
        meta = json.loads(members[name.replace(".mp4", ".json")])
        assert {"label", "direction"} <= set(meta)
    recipe = json.loads((demo_data / "recipe.json").read_text())
    assert recipe["soundtrack"] == "digit direction, centred"


def test_overhang_starts_and_ends_the_slide_past_the_frame_edges():
    """motion_frames' overhang o: the glyph's slide runs from o px past one edge to o px past the other, so it
    travels size - glyph + 2o; at o = 0 it stays inside the frame, as the demo's clips are built."""
    glyph = np.full((8, 8), 16.0)
    for o in (0, 8):
        frames = motion_frames(glyph, "right", 16, 64, 48, random.Random(0), o)
        lit = [np.nonzero(frames[t, :, :, 0].max(0))[0] for t in (0, 15)]
        assert frames.shape == (16, 64, 64, 3)
        assert (lit[0].min(), lit[0].max(), lit[1].min(), lit[1].max()) == (0, 47 - o, 16 + o, 63)
    down = motion_frames(glyph, "down", 16, 64, 48, random.Random(0), 8)
    rows = [np.nonzero(down[t, :, :, 0].max(1))[0] for t in (0, 15)]
    assert (rows[0].max(), rows[1].min()) == (39, 24)


def test_a_part_written_alone_holds_what_the_parallel_build_wrote(demo_data, tmp_path):
    """The builder writes three parts at once in worker processes; each part draws from its own seeded RNG, so
    the same part written alone, here, holds the same samples byte for byte."""
    write_part(tmp_path, "speech-val-seen", 0, 100)  # the demo_data fixture's seed and --shard-size
    alone, built = _members(tmp_path / "speech-val-seen"), _members(demo_data / "speech-val-seen")
    assert len(alone) == 3 * 200 and alone == built
