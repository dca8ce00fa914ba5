"""Stopping on request: SIGTERM (what schedulers and torchrun send) or Ctrl-C end the run between two steps,
after a checkpoint, so a stopped job resumes where it was. A second signal stops at once, except while a checkpoint
is being written: that finishes first, so that nothing half-written is left (see ``deferred``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from fastpretrain.errors import UserError


class Stopped(UserError):
    """The run stopped on a signal after saving its checkpoint; exits like the shell's 128 + signal number."""

    def __init__(self, signum: int, step: int, output: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"continue with --output {output} --resume auto")
        self.exit_code = 128 + signum


class StopOnSignal:
    """Context manager: ``requested`` becomes the signal number once SIGTERM or SIGINT arrives."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}
        self._deferring = False
        self._again = False

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
        elif self._deferring:
            self._again = True  # raised once the checkpoint is written
        else:
            raise KeyboardInterrupt  # asked twice: do not wait for the step to finish

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section a second signal does not interrupt (a checkpoint write): it takes effect when the section ends."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._again:
            raise KeyboardInterrupt

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
