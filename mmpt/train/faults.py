"""Fault injection for the recovery tests: real failures (SIGKILL, an exception) at a chosen point of a real run.

    MMPT_FAULT=save:20:1  rank 1 is SIGKILLed inside the save of step 20, after writing its files
    MMPT_FAULT=step:5:1   rank 1 raises at step 5

A fault fires in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset), so a group restarted by
`--max-restarts` runs through. Unset (always, outside tests) this costs one dict lookup per call.
"""
from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    pass


def maybe(point: str, step: int, rank: int) -> None:
    wanted = os.environ.get("MMPT_FAULT")
    if not wanted or wanted != f"{point}:{step}:{rank}" or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if point == "save":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {point} {step} on rank {rank} (MMPT_FAULT={wanted})")
