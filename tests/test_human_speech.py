"""data_pipelines/human_speech.py --narrowband: any audio shards through the 8 kHz telephone band."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds

from mmpt.data.shards import write_shards
from tests.media_files import spoken

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))
import human_speech  # noqa: E402


def test_narrowband_copy_keeps_labels_and_loses_the_top_band(tmp_path):
    words = ["seven", "three"]
    wavs = [spoken(tmp_path / f"{w}.wav", w) for w in words]
    write_shards(({"__key__": f"s{i}", "wav": wav, "txt": f"the spoken word {w}", "json": {"label": i}}
                  for i, (w, wav) in enumerate(zip(words, wavs, strict=True))), tmp_path / "src", "src", 1)
    assert human_speech.main(["--narrowband", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    out = sorted(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False),
                 key=lambda s: s["__key__"])
    assert [s["__key__"] for s in out] == ["s0", "s1"] and "wav" not in out[0]
    for i, sample in enumerate(out):
        assert json.loads(sample["json"])["label"] == i and sample["txt"].decode() == f"the spoken word {words[i]}"
        narrow, rate = sf.read(io.BytesIO(sample["flac"]))
        original, original_rate = sf.read(io.BytesIO(wavs[i]))
        assert rate == 8000 and original_rate > 8000
        assert abs(len(narrow) / rate - len(original) / original_rate) < 0.01  # same duration
        spectrum = np.abs(np.fft.rfft(original))
        top = spectrum[np.fft.rfftfreq(len(original), 1 / original_rate) > 4000]
        assert top.sum() > 0.01 * spectrum.sum()  # espeak-ng's voice had energy above 4 kHz, the copy cannot
