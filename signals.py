"""Signals received by this process: recorded, so that one raised where Python ignores exceptions (a weakref
callback, a __del__, a library that wraps what it catches) is still honoured at the next commit point.

The CLI's handler (tools/entry.py) records a signal here, then raises :class:`errors.Interrupted` once;
atomic.py calls :func:`check` right before an output takes its final name, and the CLI before it reports
success, so an interrupted command never leaves a new output behind or exits 0.
"""

from __future__ import annotations

from .errors import Interrupted

received: list[int] = []


def check() -> None:
    """Raise Interrupted if a signal arrived (even one whose exception was swallowed)."""
    if received:
        raise Interrupted(received[0])
