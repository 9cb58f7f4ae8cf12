"""Zero-shot evaluation (classification now; retrieval and captioning grow here)."""
