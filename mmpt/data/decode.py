"""Decoding one webdataset sample into tensors keyed by modality.

Bad input never raises out of the stream: `SampleDecoder` raises `BadSample(reason)`, which the stream
counts per reason and reports (see `mmpt.data.stream`).
"""
from __future__ import annotations

import io
import json

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from mmpt.data.tokenizer import tokenize

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
MAX_IMAGE_PIXELS = 64_000_000
# Every reason a sample can be skipped for (the stream adds "corrupt_tar"); totals are kept per reason.
SKIP_REASONS = ("corrupt_tar", "missing_image", "undecodable_image", "oversize_image",
                "missing_caption", "empty_caption", "bad_json")  # decompression-bomb guard: refuse, don't allocate


class BadSample(Exception):
    """A sample that cannot be used; `reason` is a short stable tag used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_transform(size: int, train: bool) -> T.Compose:
    # Mild crop-scale jitter only: digit identity must survive the augmentation.
    geometry = (T.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True) if train
                else T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)]))
    return T.Compose([T.ToImage(), geometry, T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])


def decode_image(data: bytes, transform) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise BadSample("oversize_image", f"{img.width}x{img.height}")
            img = ImageOps.exif_transpose(img).convert("RGB")
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("undecodable_image", str(e)) from None
    return transform(img)


class SampleDecoder:
    """Raw webdataset sample (bytes per key) -> {"image": (3,H,W), "text": (L,), "label": int, "__key__"}."""

    def __init__(self, image_size: int, context_length: int, train: bool):
        self.transform = image_transform(image_size, train)
        self.context_length = context_length

    def __call__(self, sample: dict) -> dict:
        out = {"__key__": sample.get("__key__", "?"), "__url__": sample.get("__url__", "?")}
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise BadSample("missing_image", f"keys {sorted(k for k in sample if not k.startswith('__'))}")
        out["image"] = decode_image(sample[key], self.transform)
        text = sample.get("txt")
        if text is None:
            raise BadSample("missing_caption")
        text = text.decode("utf-8", errors="replace").strip() if isinstance(text, bytes) else str(text).strip()
        if not text:
            raise BadSample("empty_caption")
        out["text"] = tokenize([text], self.context_length)[0]
        out["label"] = -1
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError) as e:
                raise BadSample("bad_json", str(e)) from None
            out["label"] = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
        return out
