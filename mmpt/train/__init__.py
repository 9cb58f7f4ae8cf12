"""Training: the loop (`loop.py`), the DeepSpeed engine (`engine.py`), GradCache steps (`accumulate.py`),
checkpoints and resuming (`checkpoint.py`, `resume.py`, `reshard.py`, `preempt.py`), logging (`runlog.py`,
`throughput.py`). A regular package, not a namespace one, so that import graphs (grimp, import-linter) see it."""
