"""One webdataset sample (bytes per key) -> tensors keyed by modality, for the modalities a source pairs.

Which key holds a modality and which decoder reads it come from the modality registry (`mmpt.modality`).
Bad input never raises out of the stream: `SampleDecoder` raises `BadSample` with a reason tagged by
modality (e.g. `undecodable_video`), which the stream counts and reports (see `mmpt.data.stream`).
"""
from __future__ import annotations

import contextlib
import json
import random

from mmpt import modality
from mmpt.data.media import DecodeSettings
from mmpt.data.samples import BadSample


def sample_label(sample: dict) -> int:
    """The class index in json["label"] (or a `cls` file), -1 when there is none; a label that is no integer
    is a BadSample ("bad_label"), skipped and counted as any other bad input is."""
    if "json" not in sample:
        return _class_index(sample["cls"], "cls") if "cls" in sample else -1
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", str(e)) from None
    return _class_index(meta.get("label") if isinstance(meta, dict) else None, "json label")


def _class_index(value, where: str) -> int:
    """An int, or text / an integral float holding one; None and "" (a manifest's empty label cell) are none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if value is None or (isinstance(value, str) and not value.strip()):
        return -1
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # "cat": falls through to the BadSample
            return int(value)
    raise BadSample("bad_label", f"{where} {value!r} is not a class index")


def missing(sample: dict, name: str) -> BadSample:
    present = sorted(k for k in sample if not k.startswith("__"))
    unknown = [k for k in present if k not in modality.known_keys()]
    return BadSample("unknown_extension" if unknown else f"missing_{name}", f"keys {present}")


class SampleDecoder:
    """Decode the given modalities of a sample (a modality may come from a carrier's file: audio from a
    video's sound track, then cut from the time the carrier's frames cover)."""

    def __init__(self, modalities: list, settings: DecodeSettings, train: bool):
        try:
            self.entries = [modality.get(m) for m in modality.ordered(modalities)]  # carriers before the carried
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        self.settings, self.train = settings, train
        self.carriers = {e.carried_by for e in self.entries if e.in_window is not None} & set(modalities)

    def _decode(self, sample: dict, entry: modality.Modality, rng: random.Random, windows: dict):
        key, carried = modality.sample_key(sample, entry.name)
        if key is None:
            raise missing(sample, entry.name)
        try:
            if carried and entry.carried_by in windows:
                return entry.in_window(sample[key], self.settings, self.train, rng, windows[entry.carried_by])
            if entry.name in self.carriers and entry.timed is not None:
                out, windows[entry.name] = entry.timed(sample[key], self.settings, self.train, rng)
                return out
            return entry.decode(sample[key], self.settings, self.train, rng)
        except BadSample as e:
            raise BadSample(f"{e.reason}_{entry.name}", str(e)) from None

    def __call__(self, sample: dict) -> dict:
        rng = random.Random(sample.get("__seed__", 0))
        out = {"__key__": sample.get("__key__", "?"), "__url__": sample.get("__url__", "?")}
        windows: dict = {}  # carrier modality -> (start, end) seconds its decoded part covers
        for entry in self.entries:
            out[entry.name] = self._decode(sample, entry, rng, windows)
        out["label"] = sample_label(sample)
        return out
