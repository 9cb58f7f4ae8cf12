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
from mmpt.data.media import BadSample, DecodeSpec


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

    def __init__(self, modalities: list, spec: DecodeSpec, train: bool):
        try:
            self.specs = [modality.get(m) for m in modality.ordered(modalities)]  # carriers before the carried
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        self.spec, self.train = spec, train
        self.carriers = {s.carried_by for s in self.specs if s.in_window is not None} & set(modalities)

    def _decode(self, sample: dict, spec: modality.Modality, rng: random.Random, windows: dict):
        key, carried = modality.sample_key(sample, spec.name)
        if key is None:
            raise missing(sample, spec.name)
        try:
            if carried and spec.carried_by in windows:
                return spec.in_window(sample[key], self.spec, self.train, rng, windows[spec.carried_by])
            if spec.name in self.carriers and spec.timed is not None:
                out, windows[spec.name] = spec.timed(sample[key], self.spec, self.train, rng)
                return out
            return spec.decode(sample[key], self.spec, self.train, rng)
        except BadSample as e:
            raise BadSample(f"{e.reason}_{spec.name}", str(e)) from None

    def __call__(self, sample: dict) -> dict:
        rng = random.Random(sample.get("__seed__", 0))
        out = {"__key__": sample.get("__key__", "?"), "__url__": sample.get("__url__", "?")}
        windows: dict = {}  # carrier modality -> (start, end) seconds its decoded part covers
        for spec in self.specs:
            out[spec.name] = self._decode(sample, spec, rng, windows)
        out["label"] = sample_label(sample)
        return out
