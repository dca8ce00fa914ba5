"""Stopping on request: SIGTERM (what schedulers and torchrun send) or Ctrl-C end the run between two steps,
after a checkpoint, so a stopped job resumes where it was. A second signal stops at once."""

from __future__ import annotations

import signal
import threading

from fastpretrain.errors import UserError


class Stopped(UserError):
    """The run stopped on a signal after saving its checkpoint; exits like the shell's 128 + signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"continue with --resume {checkpoint}")
        self.exit_code = 128 + signum


class StopOnSignal:
    """Context manager: ``requested`` becomes the signal number once SIGTERM or SIGINT arrives."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # asked twice: do not wait for the step to finish
        self.requested = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
