"""`<folder>.lock` beside a store, run folder or shards folder: a second writer refuses instead of corrupting.

Mutual exclusion is the kernel's: the holder keeps an `flock` on the lock file, which dies with its process
(`kill -9`, OOM, a lost container), so a lock is never "stale" for long and taking it over is atomic: two
processes racing for a dead writer's lock cannot both win. The file also records who holds it (pid, host,
the pid's start time from /proc/<pid>/stat field 22, the boot id), for the message and for lock files written
without flock (older versions of this code): such a lock counts as held only while its pid is alive on this
host, is the very process (same start time) and was not started after the lock was taken.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pipeline.errors import UserError


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def pid_start(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_time() -> float | None:
    for line in (_read("/proc/stat") or "").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return None


def holder_alive(other: dict) -> bool:
    """Whether the writer a lock file names may still be running (only for locks not held by flock)."""
    if other.get("host") != socket.gethostname():
        return True  # another machine on a shared disk: we cannot tell, so it is held
    if other.get("boot_id") and boot_id() and other["boot_id"] != boot_id():
        return False  # written before a reboot / container restart
    pid = int(other.get("pid", -1))
    if pid == os.getpid() or not _pid_alive(pid):
        return False  # our own pid (a restarted container reuses low pids) or nobody
    start = pid_start(pid)
    if "start" in other:
        return start is None or start == other["start"]  # a reused pid has another start time
    bt, since = _boot_time(), other.get("since")
    if start is not None and bt is not None and since is not None:
        return bt + start / os.sysconf("SC_CLK_TCK") <= float(since) + 2  # started after the lock: reused pid
    return True


class FolderLock:
    """Exclusive writer lock `<target>.lock`; `who` names the writer in messages ("encoder", "training", ...)."""

    def __init__(self, target: Path, who: str = "writer", noun: str = "the folder"):
        self.target = Path(str(target).rstrip("/"))
        self.path = Path(str(self.target) + ".lock")
        self.who, self.noun = who, noun
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _refuse(self, other: dict) -> UserError:
        return UserError(f"another {self.who} (pid {other.get('pid', '?')} on {other.get('host', '?')}) is writing "
                         f"{self.target}; wait for it, or delete {self.path} if none is running")

    def acquire(self) -> "FolderLock":
        if self.fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(20):
                # The held descriptor is read-only (flock does not need write access): a file open for writing
                # would keep its filesystem from being remounted read-only (EBUSY) while we hold the lock.
                fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._refuse(self._content()) from None
                # The file we locked may have been unlinked by its last holder meanwhile: lock the live one.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                other = self._content()
                if other.get("pid") is not None and not other.get("flock") and holder_alive(other):  # old-style
                    os.close(fd)
                    raise self._refuse(other)
                me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                      "start": pid_start(os.getpid()), "boot_id": boot_id(), "flock": True}
                try:  # written through a second, short-lived descriptor: closing it keeps fd's flock
                    w = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
                    try:
                        os.write(w, json.dumps(me).encode())
                    finally:
                        os.close(w)
                except OSError:
                    os.close(fd)
                    raise
                self.fd = fd
                return self
        except OSError as e:
            raise UserError(f"cannot write to {self.noun} {self.target}: cannot create its lock {self.path}: "
                            f"{e.strerror or e}") from None
        raise UserError(f"could not take the lock {self.path} (it keeps being replaced)")

    def _content(self) -> dict:
        try:
            other = json.loads(self.path.read_text() or "{}")
            return other if isinstance(other, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still locked: a waiter re-checks the inode
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
