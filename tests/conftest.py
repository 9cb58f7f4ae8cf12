"""Shared fixtures: real demo shards built once per session in a temp dir, and helpers to run torchrun."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list, timeout: int = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo dataset, built by its real builder script into a temp dir."""
    out = tmp_path_factory.mktemp("demo")
    proc = run([sys.executable, "data_pipelines/demo_digits.py", "--out", str(out), "--shard-size", "100"])
    assert proc.returncode == 0, proc.stderr
    return out
