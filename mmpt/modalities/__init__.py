"""The built-in modalities, one file each: importing this package registers them (mmpt/__init__ does).

Each file holds everything mmpt knows about its modality: the registry entry (webdataset keys, decoder glue,
probe, stem factory, default prompts, token and FLOP counts) and the dataclasses of its config sections with their
checks. A plugin modality is one such file of the user's (tests/test_modality.py writes one).
"""
from mmpt.modalities import audio, image, text, video

__all__ = ["audio", "image", "text", "video"]
