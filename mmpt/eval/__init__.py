"""Evaluation: zero-shot classification, retrieval and captioning, single process or under torchrun.

Each eval is one file that registers itself in the eval registry (mmpt.evals): importing this package
registers the built-ins.
"""
from mmpt.eval import caption, retrieval, zeroshot

__all__ = ["caption", "retrieval", "zeroshot"]
