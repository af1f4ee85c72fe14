"""`<folder>.lock` beside a store, run folder or shards folder: a second writer refuses instead of
corrupting.

Mutual exclusion is the kernel's: the holder keeps an `flock` on the lock file, which dies with its
process (`kill -9`, OOM, a lost container), so a lock is never "stale" for long and taking it over
is atomic: two processes racing for a dead writer's lock cannot both win. The file also records who
holds it (pid, host, the pid's start time from /proc/<pid>/stat field 22, the boot id), for the
message and for lock files written without flock (older versions of this code): such a lock counts
as held only while its pid is alive on this host, is the very process (same start time) and was not
started after the lock was taken.

The lock sits beside the folder, in a folder we did not make: it is opened with O_NOFOLLOW and must
be a regular file with one link holding a record of ours (or nothing), so a planted symlink, hard
link or file is refused with one line and left as it is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.osutil import printable

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def pid_start(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if unknown.
    """
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
    """Whether the writer a lock file names may still be running (only for locks not held by flock).
    """
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
    """Exclusive writer lock `<target>.lock`; `who` names the writer in messages ("encoder",
    "training", ...)."""

    def __init__(self, target: Path, who: str = "writer", noun: str = "the folder"):
        self.target = Path(str(target).rstrip("/"))
        self.path = Path(str(self.target) + ".lock")
        self.who, self.noun = who, noun
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _refuse(self, other: dict) -> UserError:
        who = f"another {self.who} (pid {other.get('pid', '?')} on {other.get('host', '?')})"
        return UserError(f"{who} is writing {printable(str(self.target))}; wait for it, or delete "
                         f"{printable(str(self.path))} if none is running")

    def _not_ours(self, what: str) -> UserError:
        return UserError(f"{printable(str(self.path))} {what}, not a lock of this tool: "
                         "refusing to use it (nothing was changed); remove it if you made it, or "
                         "write to another folder")

    def _open(self) -> int:
        """The lock file, created if absent: never through a planted symlink (O_NOFOLLOW), never a
        FIFO we would block on, never a hard link to someone's file (it would be overwritten with
        our record)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK | NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._not_ours("is a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            regular = stat.S_ISREG(st.st_mode)
            raise self._not_ours("has other links" if regular else "is not a regular file")
        return fd

    def _take(self, fd: int) -> bool:
        """With the flock held on `fd`: False if the path now names another file (retry); raises if
        the file is not ours or an old-style holder lives; else writes our record into the very file
        locked."""
        try:
            same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its last holder unlinked the file we locked meanwhile: lock the live one
            return False
        other = self._content(fd)
        if other is None:
            raise self._not_ours("holds something else")
        old_style = other.get("pid") is not None and not other.get("flock")
        if old_style and holder_alive(other):
            raise self._refuse(other)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "start": pid_start(os.getpid()), "boot_id": boot_id(), "flock": True}
        # Written through a second, short-lived descriptor (closing it keeps fd's flock), checked to
        # be the same file before anything is truncated.
        w = os.open(self.path, os.O_WRONLY | NOFOLLOW)
        try:
            if os.fstat(w).st_ino != os.fstat(fd).st_ino:
                return False
            os.ftruncate(w, 0)
            os.write(w, json.dumps(me).encode())
        finally:
            os.close(w)
        return True

    def acquire(self) -> "FolderLock":
        if self.fd is not None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(20):
                # The held descriptor is read-only (flock does not need write access): a file open
                # for writing would keep its filesystem from being remounted read-only (EBUSY) while
                # we hold the lock.
                fd = self._open()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    other = self._content(fd) or {}
                    os.close(fd)
                    raise self._refuse(other) from None
                try:
                    taken = self._take(fd)
                except BaseException:
                    os.close(fd)
                    raise
                if taken:
                    self.fd = fd
                    return self
                os.close(fd)
        except OSError as e:
            target, lock = printable(str(self.target)), printable(str(self.path))
            raise UserError(f"cannot write to {self.noun} {target}: cannot create its lock {lock}: "
                            f"{e.strerror or e}") from None
        raise UserError(f"could not take the lock {printable(str(self.path))} (it keeps being "
                        "replaced)")

    @staticmethod
    def _content(fd: int) -> dict | None:
        """The lock's record read through `fd`: {} when empty (a writer killed before writing it),
        None when the file holds anything but a record of ours."""
        try:
            data = os.pread(fd, 65536, 0)
        except OSError:
            return {}
        if not data.strip():
            return {}
        try:
            other = json.loads(data)
        except ValueError:
            return None
        return other if isinstance(other, dict) and "pid" in other else None

    def release(self) -> None:
        if self.fd is not None:
            try:  # while still locked (a waiter re-checks the inode), and only our own file
                if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
