"""Operating-system plumbing shared by stages and stores: atomic writes, directory fsync,
SIGINT/SIGTERM scopes, file names made safe to print."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Callable

# Bidirectional overrides and line/paragraph separators reorder or break what a terminal shows.
_INVISIBLE = (set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
              | {0x200E, 0x200F, 0x2028, 0x2029})


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable: what a done marker or pointer
    promises."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temp file in `path`'s folder, which then replaces `path` in one rename:
    a reader sees the old file or the whole new one, never half of it (a crash leaves no temp file
    behind either)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_write`), fsynced before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def printable(text: str) -> str:
    """`text` with control characters (escape codes, newlines), bidi overrides and undecodable bytes
    of a file name (lone surrogates) written as escapes, so a hostile name cannot drive the
    terminal; plain text is unchanged."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or 0x7F <= o < 0xA0 or o in _INVISIBLE or 0xD800 <= o <= 0xDFFF:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if o < 0xD800 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


class SignalScope:
    """While inside, SIGINT and SIGTERM go to `self._handle(signum, frame)`; the previous handlers
    come back on exit. Only the main thread can install handlers, so elsewhere (tests, embedding) it
    is a no-op."""

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
