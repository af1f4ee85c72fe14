"""A child process and everything it starts, as one process group: stopped whole, never left behind.

img2dataset's coordinating process starts a logger process and a pool of download workers. Left in our own
process group they outlive `pipeline fetch` when it is killed (a SIGTERM's default action, `kill -9`), and
`Process.terminate()` reaches only the coordinator. So the child makes itself a process group leader before it
starts anything (its workers inherit the group), the parent signals the whole group on the way out
(`stop`), and a watchdog thread in the child kills the group once its parent is gone (`kill -9` of the parent,
where no code of the parent can run). POSIX only (Linux /proc is used to see who is still alive).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable


def become_group_leader(parent_pid: int, poll_s: float = 0.5) -> None:
    """In the child, first thing: own process group + a watchdog that kills the group when the parent dies."""
    os.setpgrp()

    def watch() -> None:
        while os.getppid() == parent_pid:  # re-parented (to init or a subreaper) once the parent has died
            time.sleep(poll_s)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def members(pgid: int) -> list[int]:
    """Live (not zombie) processes of group pgid."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: ask the kernel whether the group has anyone at all
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def _send(proc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group exists once the child has called become_group_leader
    except (ProcessLookupError, PermissionError):
        pass
    if proc.is_alive():  # it may not have got that far yet
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def stop(proc, hurry: Callable[[], bool] = lambda: False,
         steps: tuple = ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0))) -> list[int]:
    """Stop `proc` (a multiprocessing Process that called become_group_leader) and its whole group.

    SIGINT first (img2dataset's handler removes its temp folder), then SIGTERM, then SIGKILL, each with a grace
    period; `hurry()` true (a second Ctrl-C) skips to SIGKILL. Returns the pids still alive at the end (none).
    """
    for sig, grace in steps:
        if not (proc.is_alive() or members(proc.pid)):
            break
        if hurry() and sig != signal.SIGKILL:
            continue
        _send(proc, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.is_alive() or members(proc.pid)):
            if hurry() and sig != signal.SIGKILL:
                break
            proc.join(0.1)
    proc.join(1)
    return members(proc.pid)
