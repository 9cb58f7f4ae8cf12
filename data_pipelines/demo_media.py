"""Media for the embedded demo: spoken digit words (espeak-ng and flite) and short videos of a digit moving in a named
direction with a voice saying digit and direction as their audio track (encoded by PyAV: H.264 + AAC in MP4).

Used by demo_digits.py; needs the `espeak-ng` program and, for a second synthesiser, `flite` (Debian packages of
the same names; `make` installs them as root; without flite all voices are espeak-ng's).
"""
from __future__ import annotations

import io
import random
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf

# Voices are split so that zero-shot on speech-val measures the word, not the voice: training speech uses the
# "train" voices only, held-out speech uses voices never heard in training: other espeak-ng accents with other
# voice variants, and other flite voices (a second, unrelated synthesiser: diphone/clustergen, not formants).
ESPEAK_ACCENTS = {"train": ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-gbclan"],
                  "heldout": ["en-gb-x-rp", "en-us-nyc", "en-gb-x-gbcwmd"]}
ESPEAK_VARIANTS = {"train": ["", "m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt3", "croak", "grandma"],
                   "heldout": ["m5", "m6", "m7", "f4", "f5", "klatt2", "klatt4", "grandpa"]}
FLITE_VOICES = {"train": ["kal", "rms"], "heldout": ["slt", "awb"]}
FLITE_SHARE = 0.3  # of the utterances in each split, when flite is installed
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEECH_RATE = 16000


def require(program: str, package: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        raise SystemExit(f"demo: the {program} program is missing (Debian: apt-get install {package}; `make demo` "
                         "installs it when run as root)")
    return exe


def require_espeak() -> str:
    return require("espeak-ng", "espeak-ng")


def have_flite() -> bool:
    return shutil.which("flite") is not None


def voice_for(split: str, rng: random.Random) -> tuple[str, str]:
    """(synthesiser, voice) drawn from the split's voices: "train" or "heldout"."""
    if have_flite() and rng.random() < FLITE_SHARE:
        return "flite", rng.choice(FLITE_VOICES[split])
    variant = rng.choice(ESPEAK_VARIANTS[split])
    return "espeak-ng", rng.choice(ESPEAK_ACCENTS[split]) + (f"+{variant}" if variant else "")


def _synthesise(word: str, synth: str, voice: str, rng: random.Random, path: str) -> None:
    if synth == "flite":  # speed and pitch through flite's duration stretch and F0 target
        cmd = [require("flite", "flite"), "-voice", voice, "--setf", f"duration_stretch={rng.uniform(0.8, 1.25):.2f}",
               "--setf", f"int_f0_target_mean={rng.randint(90, 180)}", "-t", word, "-o", path]
    else:
        cmd = [require_espeak(), "-v", voice, "-s", str(rng.randint(120, 200)), "-p", str(rng.randint(25, 75)),
               "-w", path, word]
    subprocess.run(cmd, check=True, capture_output=True)


def stretch(wav: np.ndarray, n: int) -> np.ndarray:
    """`wav` linearly resampled to `n` samples, float32."""
    return np.interp(np.linspace(0, len(wav) - 1, n), np.arange(len(wav)), wav).astype(np.float32)


def speak(word: str, rng: random.Random, split: str = "train") -> tuple[np.ndarray, str]:
    """One spoken rendition of `word` by a random voice of `split`, with random speed and pitch: float32 mono
    at 16 kHz, and the voice's name ("espeak-ng:en-us+m3", "flite:slt")."""
    synth, voice = voice_for(split, rng)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        _synthesise(word, synth, voice, rng, f.name)
        wav, sr = sf.read(f.name, dtype="float32")
    # espeak-ng speaks at 22,050 Hz, flite at 8 or 16 kHz; linear is fine here
    wav = stretch(wav, int(len(wav) * SPEECH_RATE / sr))
    return wav, f"{synth}:{voice}"


def flac_bytes(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, SPEECH_RATE, format="FLAC")
    return buf.getvalue()


def soundtrack(wav: np.ndarray, clip_seconds: float, max_voiced: float, threshold: float = 0.02) -> np.ndarray:
    """The voiced part of `wav` (samples above `threshold`), sped up to at most `max_voiced` seconds, centred in
    `clip_seconds` of silence: float32 at SPEECH_RATE."""
    loud = np.nonzero(np.abs(wav) > threshold)[0]
    voiced = wav[loud[0]:loud[-1] + 1] if len(loud) else wav
    most = int(max_voiced * SPEECH_RATE)
    if len(voiced) > most:  # a slightly faster voice, rather than a word cut off by the audio window
        voiced = stretch(voiced, most)
    total = max(int(clip_seconds * SPEECH_RATE), len(voiced))
    out = np.zeros(total, dtype=np.float32)
    start = (total - len(voiced)) // 2
    out[start:start + len(voiced)] = voiced
    return out


def motion_frames(digit: np.ndarray, direction: str, frames: int, size: int, glyph_size: int,
                  rng: random.Random, overhang: int = 0) -> np.ndarray:
    """(T, size, size, 3) uint8: the digit (white on black, glyph_size pixels) sliding across the frame in
    `direction`, from `overhang` pixels past one edge to `overhang` past the other (partly outside at the ends)."""
    from PIL import Image

    glyph = np.asarray(Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8)).resize((glyph_size, glyph_size),
                                                                                          Image.BICUBIC))
    dx, dy = DIRECTIONS[direction]
    g, o = glyph.shape[0], overhang
    travel = size - g + 2 * o
    cross = o + rng.randint(0, size - g)  # position on the axis it does not move along: inside the frame
    canvas = np.zeros((frames, size + 2 * o, size + 2 * o, 3), dtype=np.uint8)  # the frame plus its margins
    for t in range(frames):
        along = int(round(t * travel / max(1, frames - 1)))
        x = (along if dx > 0 else travel - along) if dx else cross
        y = (along if dy > 0 else travel - along) if dy else cross
        canvas[t, y:y + g, x:x + g] = glyph[..., None]
    return canvas[:, o:o + size, o:o + size]


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
