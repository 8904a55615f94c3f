"""Stopping a training job on request: SIGTERM (a time limit, preemption, ``scancel``) or SIGUSR1 (the warning
that ``sbatch --signal=USR1@<seconds>`` sends before a time limit) ends the current step, writes the run's
checkpoint and exits with :data:`STOPPED_STATUS`, so that a rerun of the same command resumes."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOPPED_STATUS = 75  # EX_TEMPFAIL of sysexits.h: a temporary failure, try again


class Stopped(Exception):
    """A run stopped on a signal after writing its checkpoint; its message is one line."""


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 only record that a stop was asked for (and are passed to ``forward``)."""

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.forward = forward
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        if self.forward is not None:
            self.forward(signum)

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
