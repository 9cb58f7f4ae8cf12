"""Data path: shards (write/list/check) -> decode -> stream (webdataset) -> batch dicts keyed by modality."""
