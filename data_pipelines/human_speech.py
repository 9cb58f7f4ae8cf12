"""Human speech for the demo's audio eval: a professional voice (Allison, asterisk-core-sounds) saying "zero" to
"nine", from Debian's packages, as labelled webdataset shards scored with the demo's speech classes.

    python data_pipelines/human_speech.py --out data/human-speech
    mmpt eval zeroshot --model runs/demo --modality audio --data data/human-speech \
        --classes data/demo/speech-classes.json
    python data_pipelines/human_speech.py --narrowband data/demo/speech-val --out data/speech-val-8k

The demo trains on synthetic voices only (espeak-ng, flite); this measures whether what it learned carries to a
human recording. The same ten recordings come in three telephone codings, one Debian package each: 8 kHz PCM
(`-wav`), GSM 06.10 (`-gsm`, lossy, 8 kHz) and G.722 (`-g722`, 16 kHz wideband), so a sample's channel is known
(its json says which). Each package is fetched with `apt-get download` (no root, nothing installed) and decoded
with ffmpeg. Thirty clips of one speaker is a small, single-voice set: read its top-1 as a check of the
channel, not as a speaker-independent score.

`--narrowband SHARDS` writes instead a copy of any audio shards resampled to 8 kHz (the telephone band), each
sample's other fields unchanged: the same voices through the channel the human recordings come through.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mmpt.data.shards import write_shards

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VERSION = "1.6.1-1"
# codec -> (ffmpeg input format flags, file suffix in the package)
CODECS = {"wav": ([], "wav"), "gsm": (["-f", "gsm", "-ar", "8000"], "gsm"), "g722": (["-f", "g722"], "g722")}
DIGITS = "usr/share/asterisk/sounds/en_US_f_Allison/digits"


def fetch(codec: str, work: Path) -> Path:
    """The codec's package unpacked under `work`."""
    name = f"asterisk-core-sounds-en-{codec}"
    subprocess.run(["apt-get", "download", f"{name}={VERSION}"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{name}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / codec)], check=True)
    return work / codec / DIGITS


def flac(path: Path, codec: str) -> bytes:
    flags, _ = CODECS[codec]
    cmd = ["ffmpeg", "-loglevel", "error", *flags, "-i", str(path), "-ac", "1", "-f", "flac", "-"]
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def samples(work: Path):
    for codec, (_, suffix) in CODECS.items():
        folder = fetch(codec, work)
        for label, word in enumerate(WORDS):
            yield {"__key__": f"allison-{codec}-{label}", "flac": flac(folder / f"{label}.{suffix}", codec),
                   "txt": f"the spoken word {word}",
                   "json": {"label": label, "class": word, "voice": "human:en_US_f_Allison", "codec": codec}}


def narrowband(shards: Path):
    """Every sample of `shards` with its audio resampled to 8 kHz (FLAC), its other fields as they were."""
    import soundfile as sf
    import torch
    import torchaudio
    import webdataset as wds

    for sample in wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False):
        ext = next(e for e in ("flac", "wav") if e in sample)
        wav, sr = sf.read(io.BytesIO(sample.pop(ext)), dtype="float32", always_2d=True)
        narrow = torchaudio.functional.resample(torch.from_numpy(wav.T.copy()), sr, 8000).numpy().T
        buf = io.BytesIO()
        sf.write(buf, narrow, 8000, format="FLAC")
        yield {**{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}, "flac": buf.getvalue()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="data/human-speech", type=Path)
    ap.add_argument("--narrowband", type=Path, metavar="SHARDS", help="write an 8 kHz copy of these audio shards")
    args = ap.parse_args(argv)
    if args.narrowband:
        report = write_shards(narrowband(args.narrowband), args.out, "narrowband", 100).summary()
        print(json.dumps(report))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        report = write_shards(samples(Path(tmp)), args.out, "human-speech", 100).summary()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
