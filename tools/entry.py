"""The `infini` executable's entry point: signals first, then the (heavy) imports, then the CLI.

Ctrl-C, SIGTERM and SIGHUP become one KeyboardInterrupt (errors.Interrupted), recorded in signals.py, before
anything else is imported: a signal at any moment (even while torch loads) ends in one line and exit
128 + signal, never a traceback, every writer's cleanup runs (atomic.py), and a signal whose exception a
library swallowed still stops the command before its output is committed. Training is the exception: its
steps run under signals.stop_requests(), where a first signal asks the loop to stop and save.
"""

from __future__ import annotations

import signal
import sys

from .. import signals


def main():
    for signum in signals.HANDLED:
        signal.signal(signum, signals.interrupt)
    try:
        from .cli import cli
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}) while starting: nothing was done", file=sys.stderr)
        sys.exit(128 + signum)
    try:
        cli(prog_name="infini")
    finally:   # the command is over, its outputs written or not: a signal now changes nothing
        for signum in signals.HANDLED:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":   # python -m infini_deploy.tools.entry (torchrun runs modules)
    main()
