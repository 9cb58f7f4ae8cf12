"""Media for the embedded demo: spoken digit words (espeak-ng) and short videos of a digit moving in a named
direction with the spoken word as their audio track (encoded by PyAV: H.264 + AAC in MP4).

Used by demo_digits.py; needs the `espeak-ng` program (Debian package espeak-ng; `make` installs it as root).
"""
from __future__ import annotations

import io
import random
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+f1", "+f2", "+m3", "+f4"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEECH_RATE = 16000


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("demo: the espeak-ng program is missing (Debian: apt-get install espeak-ng; `make demo` "
                         "installs it when run as root)")
    return exe


def speak(word: str, rng: random.Random) -> np.ndarray:
    """One spoken rendition of `word` with a random voice, speed and pitch, as float32 mono at 16 kHz."""
    voice = rng.choice(VOICES) + rng.choice(VARIANTS)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run([require_espeak(), "-v", voice, "-s", str(rng.randint(120, 200)), "-p", str(rng.randint(25, 75)),
                        "-w", f.name, word], check=True, capture_output=True)
        wav, sr = sf.read(f.name, dtype="float32")
    n = int(len(wav) * SPEECH_RATE / sr)  # espeak-ng speaks at 22,050 Hz; linear resampling is fine for a demo
    return np.interp(np.linspace(0, len(wav) - 1, n), np.arange(len(wav)), wav).astype(np.float32)


def flac_bytes(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, SPEECH_RATE, format="FLAC")
    return buf.getvalue()


def motion_frames(digit: np.ndarray, direction: str, frames: int, size: int, rng: random.Random) -> np.ndarray:
    """(T, size, size, 3) uint8: the digit (white on black) sliding across the frame in `direction`."""
    from PIL import Image

    glyph = np.asarray(Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize((size // 2, size // 2),
                                                                                          Image.BICUBIC))
    dx, dy = DIRECTIONS[direction]
    g, travel = glyph.shape[0], size - glyph.shape[0]
    cross = rng.randint(0, travel)  # position on the axis it does not move along
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        along = int(round(t * travel / max(1, frames - 1)))
        x = (along if dx > 0 else travel - along) if dx else cross
        y = (along if dy > 0 else travel - along) if dy else cross
        out[t, y:y + g, x:x + g] = glyph[..., None]
    return out


def mp4_bytes(frames: np.ndarray, fps: int, wav: np.ndarray) -> bytes:
    """H.264 video + AAC audio in an MP4 container, all in memory."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as box:
        video = box.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        audio = box.add_stream("aac", rate=SPEECH_RATE)
        audio.layout = "mono"
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                box.mux(packet)
        box.mux(video.encode())
        pcm = av.AudioFrame.from_ndarray(wav[None, :], format="flt", layout="mono")
        pcm.sample_rate = SPEECH_RATE
        for packet in audio.encode(pcm):
            box.mux(packet)
        box.mux(audio.encode())
    return buf.getvalue()
