"""Evaluation: zero-shot classification, retrieval and captioning, single process or under torchrun."""
