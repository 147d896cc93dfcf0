"""Preemption: SIGTERM/SIGINT ask the trainer to checkpoint at the end of the current step and exit.

Exit codes (docs/engine.md): 143 after SIGTERM (128 + 15, what Kubernetes/Slurm/spot reclaimers send), 130 after
SIGINT (128 + 2). A second SIGINT interrupts at once (KeyboardInterrupt); the checkpoint being written, if any,
stays incomplete and is ignored on resume.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from interiorfusion_core.errors import UserError


class Preempted(UserError):
    """Training stopped on a signal after writing a complete checkpoint; rerunning the same command resumes."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: str | None):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum


class PreemptionGuard:
    """Context manager recording the first SIGTERM/SIGINT. Only the main thread can install signal handlers; in
    another thread (e.g. a flow runner's worker) the guard is inert and signals keep their usual effect."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a checkpoint-and-exit as if `signum` had arrived (tests, callbacks)."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # Second Ctrl-C: the user does not want to wait for the checkpoint.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.request(signum)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


__all__ = ["Preempted", "PreemptionGuard"]
