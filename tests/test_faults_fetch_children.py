"""Fault injection, fetch: real signals to `pipeline fetch` end img2dataset's processes; torn stats files are redone.

img2dataset runs in a child process that starts its own pool and logger processes. A SIGTERM (what a scheduler
sends), a Ctrl-C (SIGINT) or a `kill -9` of `pipeline fetch` must not leave any of them downloading on their own.
A `NNNNN_stats.json` that a kill tore (img2dataset writes it in place) must count as unfinished everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import status, synthetic
from pipeline.config import FetchConfig
from pipeline.loopback import serve
from stages import encode, fetch

pytestmark = pytest.mark.faults


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) of every process (Linux /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[int(d)] = (int(fields[1]), fields[0], fields[19])
    return out


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of pid."""
    table = _proc_table()
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, (ppid, state, start) in table.items():
            if ppid == p and child not in found and state != "Z":
                found[child] = start
                frontier.append(child)
    return found


def _pool_started(pid: int) -> bool:
    """One of pid's children has two live children of its own (img2dataset's logger and a pool worker)."""
    table = _proc_table()
    kids = [c for c, (pp, st, _) in table.items() if pp == pid and st != "Z"]
    return any(sum(pp == k and st != "Z" for pp, st, _ in table.values()) >= 2 for k in kids)


def _survivors(procs: dict[int, str]) -> list[int]:
    table = _proc_table()
    return [p for p, start in procs.items() if p in table and table[p][2] == start and table[p][1] != "Z"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_to_fetch_ends_img2datasets_processes(tmp_path, sig):
    """A real signal to `pipeline fetch` (CLI, subprocess) mid-download: no img2dataset process of that run lives on.

    SIGTERM / SIGINT: exit 2 with one `error:` line saying to rerun; the rerun finishes every shard.
    SIGKILL: nothing can run in the killed process; img2dataset's side notices its parent is gone and stops.
    """
    rows = synthetic.make_rows(seed=3, count=32, broken_fraction=0.0)
    www = tmp_path / "www"
    www.mkdir()
    for r in rows:
        (www / r.file).write_bytes(synthetic.render(r.attributes))
    slow = threading.Event()
    slow.set()
    with serve(www, slow=slow, delay_s=4.0) as base:
        tsv = tmp_path / "list.tsv"
        tsv.write_text("".join(f"{r.caption}\t{base}/img/{r.file}\n" for r in rows))
        shards = tmp_path / "shards"
        cmd = [sys.executable, "-m", "pipeline", "fetch", "--source", str(tsv), "--shards", str(shards),
               "--samples-per-shard", "16", "--processes", "1", "--threads", "2"]
        # output to files, not pipes: a process left behind would hold a pipe open and hang the read
        out_f, err_f = open(tmp_path / "out", "w"), open(tmp_path / "err", "w")
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        try:
            deadline = time.monotonic() + 120
            # wait until img2dataset's pool is up: its main process has started its logger and a pool worker,
            # whose requests the server now holds for 4 s each (32 rows / 2 threads: 64 s of downloading)
            while time.monotonic() < deadline and p.poll() is None and not _pool_started(p.pid):
                time.sleep(0.2)
            time.sleep(2.0)
            kids = _descendants(p.pid)
            assert p.poll() is None and _pool_started(p.pid), (p.poll(), kids)
            os.kill(p.pid, getattr(signal, sig))
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            out_f.close()
            err_f.close()
        out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
        deadline = time.monotonic() + 10
        while _survivors(kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _survivors(kids)
        for pid in left:  # do not leave them behind for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"img2dataset processes outlived `pipeline fetch` ({sig}): {left}"
        if sig == "SIGKILL":
            assert p.returncode == -signal.SIGKILL
            return
        assert p.returncode == 2, (p.returncode, err)
        lines = [ln for ln in err.splitlines() if ln.strip() and "━" not in ln and "fetching" not in ln]
        assert "Traceback" not in err + out
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1 and "run the same command again" in errors[0], err
        assert json.loads(fetch.record_path(shards).read_text())["state"] == "interrupted"
        if sig == "SIGTERM":  # the rerun (a fast server now) finishes every shard
            slow.clear()
            again = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            assert again.returncode == 0, again.stderr
            s = status.fetch_summary(shards)
            assert (s["state"], s["rows_done"], s["fetched"]) == ("complete", 32, 32)


def test_a_torn_stats_file_is_unfinished_in_fetch_img2dataset_and_status(tiny_shards, tmp_path):
    """A truncated and an empty `NNNNN_stats.json` (a kill while img2dataset wrote them): status and encode count
    those shards unfinished, and one rerun of fetch refetches exactly them (before: 'run the same command again'
    for ever, since fetch thought them complete and img2dataset skipped them)."""
    root = tmp_path / "copy"
    shutil.copytree(tiny_shards.parent, root)
    shards = root / "shards"
    cfg = FetchConfig(count=96, samples_per_shard=32, shards=shards, synthetic_dir=root / "synthetic",
                      processes=1, threads=8, seed=0)
    before = {p.name: json.loads(p.read_text()) for p in shards.glob("*_stats.json")}
    one = shards / "00001_stats.json"
    one.write_text(one.read_text()[:40])  # cut mid-object
    (shards / "00002_stats.json").write_text("")  # killed right after open("w")
    kept = shards / "00000.tar"
    mtime = kept.stat().st_mtime_ns

    s = status.fetch_summary(shards)
    assert (s["shards_complete"], s["unfinished"]) == (1, ["00001", "00002"])
    assert [n for n, _, _ in encode.complete_shards(shards)] == ["00000.tar"]

    fetch.run(cfg)
    after = {p.name: json.loads(p.read_text()) for p in shards.glob("*_stats.json")}
    assert sorted(after) == sorted(before)
    for name in ("00001_stats.json", "00002_stats.json"):
        assert after[name]["successes"] == before[name]["successes"] and after[name]["count"] == 32
    assert kept.stat().st_mtime_ns == mtime  # the good shard is untouched
    assert status.fetch_summary(shards)["state"] == "complete"
    torn = sorted(p.name for p in (shards / "_fetch" / "torn").iterdir())
    assert len(torn) == 2 and torn[0].startswith("00001_stats") and torn[1].startswith("00002_stats")
