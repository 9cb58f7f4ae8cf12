"""Images: JPEG/PNG/WebP decoded by PIL, cut into patch x patch tokens by the shared patch stem.

Config: `data.augment.image` (ImageAugment). Sizes come from the model (`model.image_size`, `model.patch_size`),
so data and stem cannot disagree; a task may train at its own `data.tasks.<pair>.image_size`.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from PIL import Image, ImageOps

from mmpt.data import augment
from mmpt.data.media import DecodeSettings
from mmpt.data.samples import BadSample, nonempty
from mmpt.modality import CLIP_MEAN, CLIP_STD, Modality, register
from mmpt.model.stems import PatchStem


@dataclass
class ImageAugment:
    """Training augmentation of images (data.augment.image); eval decoding never augments. See mmpt.data.augment."""
    # resized: RandomResizedCrop(scale, ratio); mild: a square of the shorter side x sqrt(U(0.8, 1)) at a random
    # place (scale/ratio unused); center: the eval crop, no random crop at all.
    crop: Literal["resized", "mild", "center"] = "resized"
    scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # crop area / image area
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # crop width / height
    flip_p: float = 0.0  # horizontal flip probability: off, digits and text are not mirror symmetric
    jitter_p: float = 0.8  # probability of colour jitter (SimCLR's RandomApply)
    brightness: float = 0.3  # factors drawn from [1 - b, 1 + b]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.0  # shift drawn from [-hue, hue] (<= 0.5); RGB<->HSV costs ~2.6 ms per 224 px image
    randaugment_ops: int = 0  # RandAugment ops per image (0: off; 2 is the paper's ImageNet setting)
    randaugment_magnitude: int = 9  # 0..30 (torchvision's 31 bins)

    @classmethod
    def minimal(cls):
        """The least a training sample gets (`augment: false`): the mild random crop, nothing else; a random crop
        stays because it is how a training sample is drawn, not a transformation of it."""
        return cls(crop="mild", flip_p=0.0, jitter_p=0.0, randaugment_ops=0)


def interval(key: str, value: list, lo: float, hi: float, what: str = "") -> tuple:
    """A rule: [a, b] with lo <= a <= b <= hi; lo = 0.0 means 0 < a (a positive lower end)."""
    holds = len(value) == 2 and (value[0] > 0 if lo == 0.0 else value[0] >= lo) and value[0] <= value[1] <= hi
    low = "0 < min" if lo == 0.0 else f"{lo:g} <= min"
    high = "" if hi == float("inf") else f" <= {hi:g}"
    return key, value, holds, f"needs [min, max] with {low} <= max{high}{what}"


def pixel_rules(p: str, a: ImageAugment) -> list:
    """Checks of image augmentation (video's adds its stride_scale)."""
    rules = [interval(f"{p}.scale", a.scale, 0.0, 1.0, " (fractions of the image area)"),
             interval(f"{p}.ratio", a.ratio, 0.0, float("inf"), " (width / height)"),
             (f"{p}.hue", a.hue, 0 <= a.hue <= 0.5, "must be in [0, 0.5]"),
             (f"{p}.randaugment_magnitude", a.randaugment_magnitude, 0 <= a.randaugment_magnitude <= 30,
              "must be in [0, 30] (31 bins)")]
    rules += [(f"{p}.{k}", getattr(a, k), 0 <= getattr(a, k) <= 1, "must be a probability in [0, 1]")
              for k in ("flip_p", "jitter_p")]
    return rules + [(f"{p}.{k}", getattr(a, k), getattr(a, k) >= 0, "must be >= 0")
                    for k in ("brightness", "contrast", "saturation", "randaugment_ops")]


def pixels_to_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 3, H, W) uint8 pixels -> CLIP-normalised values in `dtype` (computed in float32 first, so every dtype
    sees the same rounding of one formula). Float input is taken as normalised already (open_clip's preprocess)."""
    if x.is_floating_point():
        return x.to(dtype)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return ((x.float().div_(255) - mean) / std).to(dtype)


def grid(cfg) -> int:
    """Patches along one side of an image (ModelConfig)."""
    return cfg.image_size // cfg.patch_size


def _repeat_in_time(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, repeat, H, W) without copying."""
    return x.unsqueeze(2).expand(-1, -1, repeat, -1, -1)


def _video_stem(cfg):
    """IMP (model.image_as_video): images go through the video stem as one tubelet of repeated frames."""
    if cfg.image_as_video and "video" in cfg.modalities:
        return "video", cfg.video.tubelet
    return None


MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard: refuse, don't allocate


def open_image(data: bytes, target: Optional[int] = None) -> Image.Image:
    nonempty(data, "image")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise BadSample("oversize", f"image {img.width}x{img.height}")
        if target and img.format == "JPEG":
            # DCT-domain downscaling: decode a 1/2, 1/4 or 1/8 size image that still covers the target.
            img.draft("RGB", (target, target))
        img = ImageOps.exif_transpose(img).convert("RGB")
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("undecodable", f"image: {e}") from None
    return img


def image_to_tensor(img: Image.Image, size: int, train: bool, rng: random.Random, aug: Any = None) -> torch.Tensor:
    """Eval: the centre square of the shorter side. Train: the crop the image augmentation `aug` draws (an
    ImageAugment, mmpt.modalities.image), then its flip / RandAugment / colour jitter. Resized to `size` once:
    (3, size, size) uint8 (the model normalises on the device: mmpt.modalities.image.pixels_to_float)."""
    w, h = img.size
    if train:
        left, top, cw, ch = augment.crop_box(w, h, aug, rng)
    else:
        side = min(w, h)
        left, top, cw, ch = (w - side) // 2, (h - side) // 2, side, side
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch), reducing_gap=2.0)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    return augment.pixel_ops(x, aug, rng) if train else x


def decode_image(data: bytes, settings: DecodeSettings, train: bool, rng: random.Random) -> torch.Tensor:
    target = settings.image_size if settings.jpeg_draft else None
    return image_to_tensor(open_image(data, target=target), settings.image_size, train, rng, settings.augment.image)


def probe_image(data: bytes) -> dict:
    img = open_image(data)
    return {"width": img.width, "height": img.height}


ENTRY = register(Modality(
    "image", ("jpg", "jpeg", "png", "webp"), decode_image, probe_image,
    stem=lambda c: PatchStem(c.width, 3, (1, c.patch_size, c.patch_size), (1, grid(c), grid(c)),
                             c.drop_token.get("image", 0.0), c.stem),
    tokens=lambda c: grid(c) ** 2, stem_input=_repeat_in_time, to_float=pixels_to_float,
    sample_shape=lambda d: (3, d.image_size, d.image_size), sample_dtype=torch.uint8,
    inputs_per_token=lambda c: 3 * c.patch_size ** 2,
    templates=("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a close-up photo of a {}."),
    shard_keys={"jpeg": "jpg"},
    augment_config=ImageAugment, augment_rules=pixel_rules, shares_stem=_video_stem))
