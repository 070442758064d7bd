"""Fault injection for the interruption tests: a real SIGKILL at a chosen point.

Set ``MLIC_FAULT`` to ``kill_at_step=N`` (the process SIGKILLs itself right after optimiser
step N) or ``kill_in_write=NAME`` (SIGKILL after the temporary file for ``NAME`` is written,
before it is renamed into place). ``term_at_step=N`` sends SIGTERM instead of SIGKILL at the
same point: the trainer's stop handler then saves a mid-epoch resume point and exits (what a
cluster scheduler's pre-emption does). Unset, these checks cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["maybe_kill"]


def maybe_kill(point: str, value: str | int) -> None:
    """SIGKILL this process when ``MLIC_FAULT`` names ``point`` with ``value`` (SIGTERM when it
    names ``point`` with ``kill_`` replaced by ``term_``)."""
    spec = os.environ.get("MLIC_FAULT")
    if not spec or "=" not in spec:
        return
    name, target = spec.split("=", 1)
    if target != str(value):
        return
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif point.startswith("kill_") and name == "term_" + point[len("kill_") :]:
        os.kill(os.getpid(), signal.SIGTERM)
