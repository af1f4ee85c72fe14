"""Fault injection under torchrun: when rank 0 cannot write (metrics, plot, summary), every rank stops with one line.

Two gloo processes on the tiny store. Rank 0's second append to `metrics.jsonl` fails with ENOSPC (injected at
`open`, the OS boundary); rank 1 must not go on into the next step's all-reduce and wait there for a rank 0 that
has left. Every rank agrees through `Dist.on_main` (one all-reduce per rank-0 write), so each prints one
`error:` line and exits 2, and the last checkpoint stays loadable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import TINY_TRAIN, cli_options

from pipeline import checkpoint

pytestmark = pytest.mark.faults

_WRAPPER = """
import builtins, errno, os, sys
os.dup2(os.open(os.path.join({logs!r}, "rank%s.err" % os.environ["RANK"]), os.O_WRONLY | os.O_CREAT, 0o644), 2)
real, calls = builtins.open, [0]
def fake_open(file, mode="r", *a, **k):
    if str(file).endswith({target!r}) and "a" in mode and os.environ["RANK"] == "0":
        calls[0] += 1
        if calls[0] == {nth}:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return real(file, mode, *a, **k)
builtins.open = fake_open
from pipeline.cli import main
sys.argv = ["pipeline", *sys.argv[1:]]
main()
"""


def test_rank0_write_failure_stops_every_rank_with_one_line(tiny_store, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    script = tmp_path / "wrapper.py"
    script.write_text(_WRAPPER.format(logs=str(logs), target="metrics.jsonl", nth=2))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--store", str(tiny_store), "--run-dir", str(run)]
    opts = {**TINY_TRAIN, "epochs": 3, "max_steps": 6, "features": "memory", "log_every": 1, "checkpoint_every": 1}
    cmd += cli_options(opts)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and time.monotonic() - t0 < 200  # torchrun reports the failure; nobody hung
    for rank, words in ((0, ("No space left on device", "metrics.jsonl")), (1, ("rank 0 could not write",))):
        err = (logs / f"rank{rank}.err").read_text()
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and all(w in lines[0] for w in words), err[-3000:]
    # the failed append was step 2's (before its checkpoint): step 1's is the last, and it checks out
    last = checkpoint.last(run / "checkpoints")
    assert last is not None and last.name == "step-00000001" and checkpoint.check(last) is None
