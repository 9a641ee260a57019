"""Signals received by this process: recorded, so that one raised where Python ignores exceptions (a weakref
callback, a __del__, a library that wraps what it catches) is still honoured at the next commit point.

The CLI's handler (:func:`interrupt`, installed by tools/entry.py) records a signal here, then raises
:class:`errors.Interrupted` once; atomic.py calls :func:`check` right before an output takes its final name,
and the CLI before it reports success, so an interrupted command never leaves a new output behind or exits 0.

Training is the one exception (:func:`stop_requests`): there a first signal is a request to stop, which the
training loop honours after its current step by saving what it learned; it is never recorded here, so that
save commits.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, NoReturn

from .errors import Interrupted

received: list[int] = []
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def check() -> None:
    """Raise Interrupted if a signal arrived (even one whose exception was swallowed)."""
    if received:
        raise Interrupted(received[0])


def interrupt(signum, frame) -> None:
    """The CLI's handler: record the signal and raise it once; a second signal during cleanup is only
    recorded, so cleanup is not cut short by a traceback (SIGKILL still ends the process)."""
    first = not received
    received.append(signum)
    if first:
        raise Interrupted(signum)


class StopRequest:
    """The first signal received inside :func:`stop_requests`, or none yet (false)."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupted"

    def due(self, steps_kept: int) -> bool:
        """Whether a training loop stops before its next step: a stop was requested, and it has steps to keep.
        Requested before any step was done, there is nothing to save: :meth:`refuse`."""
        if not self:
            return False
        if steps_kept == 0:
            self.refuse()
        return True

    def refuse(self) -> NoReturn:
        """Nothing learned yet, so nothing to save: the request becomes the interrupt it would have been
        outside training (recorded, so no output is committed; exit 128 + signal)."""
        signum = self.signum or signal.SIGINT
        received.append(signum)
        raise Interrupted(signum)


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Inside, the first SIGINT, SIGTERM or SIGHUP only sets the yielded :class:`StopRequest` (nothing is
    raised, nothing recorded): the training loop checks it between steps, stops and saves. A second signal
    is an interrupt as outside (:func:`interrupt`: the save is refused, outputs stay as they were).

    Trap: handlers can only be set from the main thread; elsewhere the request is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop or received:   # a second signal: stop now, save nothing
            interrupt(signum, frame)
            return
        stop.signum = signum
        try:   # the current step may take minutes: say that the signal was heard
            print(f"{signal.Signals(signum).name}: stopping after this step to save what was learned "
                  "(a second one stops at once without saving)", file=sys.stderr, flush=True)
        except (OSError, ValueError):   # SIGHUP: the terminal may be gone
            pass

    before = {signum: signal.signal(signum, request) for signum in HANDLED}
    try:
        yield stop
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)   # None: set outside Python
