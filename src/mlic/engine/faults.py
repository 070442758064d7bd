"""Fault injection for the interruption tests: a real SIGKILL at a chosen point.

Set ``MLIC_FAULT`` to ``kill_at_step=N`` (the process SIGKILLs itself right after optimiser
step N) or ``kill_in_write=NAME`` (SIGKILL after the temporary file for ``NAME`` is written,
before it is renamed into place). Unset, these checks cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["maybe_kill"]


def maybe_kill(point: str, value: str | int) -> None:
    """SIGKILL this process when ``MLIC_FAULT`` names ``point`` with ``value``."""
    spec = os.environ.get("MLIC_FAULT")
    if not spec or "=" not in spec:
        return
    name, target = spec.split("=", 1)
    if name == point and target == str(value):
        os.kill(os.getpid(), signal.SIGKILL)
