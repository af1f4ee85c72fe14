"""Operating-system plumbing shared by stages and stores: directory fsync, SIGINT/SIGTERM handler scopes."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable: what a done marker or pointer promises."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SignalScope:
    """While inside, SIGINT and SIGTERM go to `self._handle(signum, frame)`; the previous handlers come back on
    exit. Only the main thread can install handlers, so elsewhere (tests, embedding) it is a no-op."""

    def __init__(self):
        self.previous: dict = {}

    def _handle(self, signum, frame):  # pragma: no cover - subclasses say what a signal means
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}
