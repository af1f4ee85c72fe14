"""Fault injection, train: SIGKILL mid-checkpoint and mid-epoch, a disk that fills up, a folder gone read-only.

Each fault is followed by `--resume`, and the result must equal one uninterrupted run: same loss curve
(metrics.jsonl), same weights, same optimizer state. Already covered elsewhere (not repeated): a clean stop
(--max-steps) + resume is exact (tests/test_train.py::test_resume_reproduces_the_uninterrupted_run_exactly);
a run folder under a file is refused (test_refusals_are_one_line_and_touch_nothing); a failing write inside
checkpoint.save leaves the previous checkpoint (tests/test_checkpoint.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, cli_options

from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from stages import train

pytestmark = pytest.mark.faults

TIMING = {"samples_per_s"}  # the only field allowed to differ between two identical runs
# 6 steps/epoch on the tiny store, 12 in all; checkpoints at steps 4, 6 (epoch end), 8 and 12.
RECIPE = dict(TINY_TRAIN, epochs=2, checkpoint_every=4, log_every=1)

# Runs stage `train` in a fresh interpreter and SIGKILLs it at a chosen point: the real process dies the
# real way (no cleanup, no flush), only the moment is chosen. argv: config JSON, kill JSON.
KILLER = r"""
import json, os, signal, sys
from pathlib import Path
from pipeline import checkpoint, runlog
from pipeline.config import TrainConfig
from stages import train

cfg, kill = json.loads(sys.argv[1]), json.loads(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kill["where"] == "checkpoint":  # checkpoint `step` has its weights file on disk, not yet its state file
    real_save_file = checkpoint.save_file
    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if int((metadata or {}).get("step", -1)) == kill["step"]:
            die()
    checkpoint.save_file = save_file
else:  # the metrics line of step `step` is on disk: past the last checkpoint, mid-epoch
    real_append = runlog.MetricsLog.append
    def append(self, entry):
        real_append(self, entry)
        if entry.get("kind") == "train" and entry["step"] == kill["step"]:
            die()
    runlog.MetricsLog.append = append
train.run(TrainConfig(**{k: Path(v) if k in ("store", "run") else v for k, v in cfg.items()}))
"""


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run: Path) -> dict:
    return torch.load(checkpoint.last(run / "checkpoints") / "state.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Same loss curve, same final weights, same AdamW moments, same data position."""
    assert _metrics(a) == _metrics(b)
    wa, wb = checkpoint.load_weights(a), checkpoint.load_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = _state(a), _state(b)
    assert (sa["step"], sa["epoch"], sa["batch"]) == (sb["step"], sb["epoch"], sb["batch"])
    for k, v in sa["optimizer"]["state"].items():
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(v[m], sb["optimizer"]["state"][k][m]), (k, m)
    assert not [p for p in (b / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):
    """The uninterrupted reference run of RECIPE."""
    run = tmp_path_factory.mktemp("straight") / "run"
    summary = train.run(TrainConfig(store=tiny_store, run=run, **RECIPE))
    assert summary["complete"] and summary["total_steps"] == 12
    return run


def _killed(store: Path, run: Path, where: str, step: int, resume: bool) -> None:
    cfg = {**RECIPE, "store": str(store), "run": str(run), "resume": resume}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg), json.dumps({"where": where, "step": step})],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == -9, p.stderr[-3000:]


def test_sigkill_mid_checkpoint_then_mid_epoch_resumes_exactly(tiny_store, straight, tmp_path):
    run = tmp_path / "run"
    # 1. killed while writing checkpoint 8: its folder is a temp one holding weights but no state
    _killed(tiny_store, run, "checkpoint", 8, resume=False)
    ckpts = run / "checkpoints"
    torn = [p for p in ckpts.iterdir() if p.name.startswith(".step-00000008")]
    assert len(torn) == 1 and (torn[0] / "model.safetensors").exists() and not (torn[0] / "state.pt").exists()
    assert checkpoint.last(ckpts).name == "step-00000006"  # the epoch-end checkpoint, complete
    assert max(e["step"] for e in _metrics(run)) == 8  # the loss curve ran ahead of the checkpoint

    # 2. resumed, then killed right after step 10's metrics line: mid-epoch 2, two steps past checkpoint 8
    _killed(tiny_store, run, "metrics", 10, resume=True)
    assert checkpoint.last(ckpts).name == "step-00000008"
    assert _state(run)["batch"] == 2  # checkpoint 8 sits inside an epoch, so the resume below is mid-epoch

    # 3. resumed to the end: the very same run as never interrupted
    summary = train.run(TrainConfig(store=tiny_store, run=run, resume=True, **RECIPE))
    assert summary["steps_this_run"] == 4 and summary["complete"]
    assert_same_run(straight, run)


# The real CLI in a fresh interpreter; the process sends itself a real signal right after step `step`'s metrics
# line, as Ctrl-C (SIGINT) or a scheduler's SIGTERM would arrive mid-epoch. argv: signal name, step, CLI args.
INTERRUPTER = r"""
import os, signal, sys
from pipeline import cli, runlog

sig, at = getattr(signal, sys.argv[1]), int(sys.argv[2])
real_append = runlog.MetricsLog.append
def append(self, entry):
    real_append(self, entry)
    if entry.get("kind") == "train" and entry["step"] == at:
        os.kill(os.getpid(), sig)
runlog.MetricsLog.append = append
sys.argv = ["pipeline", "train", *sys.argv[3:]]
cli.main()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_checkpoints_the_current_step_and_resumes_exactly(tiny_store, straight, tmp_path, sig):
    run = tmp_path / "run"
    args = ["--store", str(tiny_store), "--run", str(run)]
    args += cli_options(RECIPE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-c", INTERRUPTER, sig, "9", *args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 130, p.stderr[-3000:]
    assert "stopped: training interrupted at step 9/12" in p.stderr and "Traceback" not in p.stderr
    assert f"{sig}: stopping after this step" in p.stderr
    # Step 9 is no periodic checkpoint (those are 4, 6, 8): the interruption wrote it, so nothing is redone.
    assert checkpoint.last(run / "checkpoints").name == "step-00000009"
    summary = train.run(TrainConfig(store=tiny_store, run=run, resume=True, **RECIPE))
    assert summary["steps_this_run"] == 3 and summary["complete"]
    assert_same_run(straight, run)


# --- a disk that fills up, a folder that turns read-only (tmpfs mounts: root with CAP_SYS_ADMIN) ------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 120 MiB at tmp_path/disk: one tiny-run checkpoint (75 MB: weights + AdamW) fits, two do not."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


def test_read_only_then_full_disk_are_one_line_keep_the_checkpoint_and_resume(tiny_store, straight, small_disk,
                                                                               monkeypatch):
    run = small_disk / "run"
    real_save = checkpoint.save

    def save_then_lock(*a, **k):  # the folder turns read-only right after the first checkpoint
        out = real_save(*a, **k)
        _remount(small_disk, "ro")
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_lock)
    with pytest.raises(UserError) as e:
        train.run(TrainConfig(store=tiny_store, run=run, **RECIPE))
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and "Read-only file system" in msg and str(run) in msg and "--resume" in msg, msg
    assert checkpoint.last(run / "checkpoints").name == "step-00000004"

    # writable again, but only room for one checkpoint: the next one (step 6) fills the disk
    _remount(small_disk, "rw")
    with pytest.raises(UserError) as e:
        train.run(TrainConfig(store=tiny_store, run=run, resume=True, **RECIPE))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(run) in msg, msg
    assert checkpoint.last(run / "checkpoints").name == "step-00000004"  # intact, still the newest
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the torn one is gone
    w = checkpoint.load_weights(run)
    assert set(w) == set(checkpoint.load_weights(straight)) and all(torch.isfinite(t).all() for t in w.values())

    _remount(small_disk, "size=400m")  # the user makes room
    train.run(TrainConfig(store=tiny_store, run=run, resume=True, **RECIPE))
    assert_same_run(straight, run)
