"""SIGINT / SIGTERM during `optvq train`: the loop checkpoints at the end of the step and leaves."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """While entered, SIGINT / SIGTERM set ``requested`` (the signal's name) for the loop to see;
    a second SIGINT interrupts at once. Outside the main thread no handler can be set: a no-op."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
