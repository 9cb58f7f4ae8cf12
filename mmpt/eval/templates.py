"""Shipped zero-shot prompt sets, "{}" = the class name. Chosen with `templates=` (`mmpt eval zeroshot
--templates sound`, `eval.zeroshot[i].templates`); they replace a classes file's own `templates`, which in
turn replace the modality's registry defaults.

Written for this project in the style of the usual benchmark ensembles: `photo` for object photos
(ImageNet/CIFAR), `action` for human actions in video (Kinetics), `sound` for environmental sounds
(ESC-50/AudioSet) and `speech` for spoken words (Speech Commands, spoken digits).
"""
from __future__ import annotations

from mmpt.errors import DataError

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "photo": (
        "a photo of a {}.", "a bad photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
        "a bright photo of a {}.", "a dark photo of a {}.", "a cropped photo of the {}.",
        "a low resolution photo of a {}.",
        "a photo of the large {}.", "a photo of the small {}.", "a jpeg photo of a {}.", "a good photo of the {}.",
        "a drawing of a {}.", "a rendition of a {}.", "itap of a {}.", "a photo of my {}.",
    ),
    "action": (
        "a video of a person {}.", "a photo of a person {}.", "a person {}.", "a video of {}.",
        "a clip of someone {}.", "a person is {}.", "a video of a person doing {}.", "a demonstration of {}.",
        "a blurry video of a person {}.", "a close-up video of a person {}.", "an example of {}.",
        "a person practising {}.", "footage of {}.", "people {}.",
    ),
    "sound": (
        "the sound of {}.", "a sound of a {}.", "a recording of {}.", "an audio clip of {}.",
        "the sound of a {}.", "a loud sound of {}.", "a quiet sound of {}.", "a noisy recording of {}.",
        "this is the sound of {}.", "a field recording of {}.", "{} can be heard.", "a short clip of {} sounds.",
    ),
    "speech": (
        "someone saying {}.", "a person saying the word {}.", "the spoken word {}.",
        "a recording of someone saying {}.",
        "a voice saying {}.", "the word {} spoken aloud.", "{}, spoken.", "a man saying {}.", "a woman saying {}.",
        "a child saying {}.", "someone says {}.", "a short clip of the word {}.",
    ),
}


def template_set(name: str) -> list[str]:
    """The shipped prompt set `name`; a name that is none of them is one error line listing the sets."""
    if name not in TEMPLATE_SETS:
        raise DataError(f"templates={name!r}: no such template set (shipped: {', '.join(TEMPLATE_SETS)})")
    return list(TEMPLATE_SETS[name])
