"""The writer lock (`<folder>.lock`): race-free takeover of a dead writer's lock, pid reuse, and the three
folders it guards: a feature store (encode), a run folder (train) and a shards folder (fetch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.errors import UserError
from pipeline.lock import FolderLock, pid_start

pytestmark = pytest.mark.faults

RACER = r"""
import os, sys, time
from pipeline.errors import UserError
from pipeline.store import StoreLock
target, at = sys.argv[1], float(sys.argv[2])
real_kill = os.kill
def slow_kill(pid, sig):  # widen the window between "its pid is dead" and taking the lock over
    time.sleep(0.3)
    return real_kill(pid, sig)
os.kill = slow_kill
lock = StoreLock(target)
while time.time() < at:
    pass
try:
    lock.acquire()
    print("held", flush=True)
    time.sleep(1.5)
except UserError:
    print("refused", flush=True)
"""

HOLDER = r"""
import sys, time
from pipeline.lock import FolderLock
FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_racing_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    store = tmp_path / "f.zarr"
    for attempt in range(3):
        lock = FolderLock(store)
        lock.path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}))
        at = time.time() + 2.0
        procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store), str(at)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(outs) == ["held"] + ["refused"] * 5, outs


def test_pid_reuse_and_old_style_locks(tmp_path):
    target = tmp_path / "run"
    lock = FolderLock(target, who="training")
    me = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        # a live pid with another start time is a reused pid: the lock is stale
        lock.path.write_text(json.dumps({"pid": live.pid, "host": me, "start": (pid_start(live.pid) or 0) + 1}))
        lock.acquire().release()
        # the same live process (same start time) that holds no flock (an old-style lock): refused
        lock.path.write_text(json.dumps({"pid": live.pid, "host": me, "start": pid_start(live.pid)}))
        with pytest.raises(UserError, match=f"another training \\(pid {live.pid}"):
            lock.acquire()
        # old style (no start time): a pid started after the lock was taken is a reused one
        lock.path.write_text(json.dumps({"pid": live.pid, "host": me, "since": time.time() - 3600}))
        lock.acquire().release()
        lock.path.write_text(json.dumps({"pid": live.pid, "host": me, "since": time.time() + 5}))
        with pytest.raises(UserError, match="another training"):
            lock.acquire()
        # our own pid (after a container restart) never blocks us
        lock.path.write_text(json.dumps({"pid": os.getpid(), "host": me, "since": time.time()}))
        lock.acquire()
        assert json.loads(lock.path.read_text())["start"] == pid_start(os.getpid())
        with pytest.raises(UserError, match="another training"):  # a second holder in the same process
            FolderLock(target, who="training").acquire()
        lock.release()
        assert not lock.path.exists()
    finally:
        live.kill()
        live.wait()


def _held_by_another_process(target):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_train_into_one_run_folder_refuses(tiny_store, tmp_path):
    from conftest import TINY_TRAIN

    from pipeline.config import TrainConfig
    from stages import train

    run = tmp_path / "run"
    holder = _held_by_another_process(run)
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}") as e:
            train.run(TrainConfig(store=tiny_store, run=run, **TINY_TRAIN))
        assert "\n" not in str(e.value) and not run.exists()
    finally:
        holder.kill()
        holder.wait()
    train.run(TrainConfig(store=tiny_store, run=run, **{**TINY_TRAIN, "max_steps": 1}))  # the holder died: free


def test_a_second_fetch_into_one_shards_folder_refuses(tmp_path):
    from pipeline.config import FetchConfig
    from stages import fetch

    shards = tmp_path / "shards"
    holder = _held_by_another_process(shards)
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}") as e:
            fetch.run(FetchConfig(count=8, samples_per_shard=8, shards=shards, synthetic_dir=tmp_path / "syn",
                                  processes=1, threads=2))
        assert "\n" not in str(e.value) and not shards.exists()
    finally:
        holder.kill()
        holder.wait()
