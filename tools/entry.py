"""The `infini` executable's entry point: signals first, then the (heavy) imports, then the CLI.

SIGTERM and SIGHUP are turned into KeyboardInterrupt, as Ctrl-C is, before anything else is imported, so a
signal at any moment (even while torch loads) ends in one line and exit 128 + signal, never a traceback, and
every writer's cleanup runs (atomic.py).
"""

from __future__ import annotations

import signal
import sys

from ..errors import Interrupted


def _terminate(signum, frame):
    raise Interrupted(signum)


def main():
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        from .cli import cli
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}) while starting: nothing was done", file=sys.stderr)
        sys.exit(128 + signum)
    cli(prog_name="infini")
