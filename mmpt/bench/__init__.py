"""Benchmarks: `mmpt bench NAME --json` prints one JSON object with the named peer measured in the same run."""
