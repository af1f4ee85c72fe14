"""Atomic checkpoints: round trip of weights, optimizer, scheduler and RNG; failures leave the last one intact."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from pipeline import checkpoint
from pipeline.errors import UserError


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_continues_exactly(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=3, epoch=1, batch=2,
                           extra={"acc": torch.arange(4, dtype=torch.float64)})
    random.random()
    _train(model, opt, sched, 2)  # the uninterrupted continuation (uses the torch RNG for its data)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    m2, o2, s2 = _setup(seed=1)  # different init: everything must come from the checkpoint
    state = checkpoint.load(tmp_path, model=m2, optimizer=o2, scheduler=s2)
    assert (state["step"], state["epoch"], state["batch"]) == (3, 1, 2)
    assert torch.equal(state["extra"]["acc"], torch.arange(4, dtype=torch.float64))
    assert checkpoint.last(tmp_path) == path and path.name == "step-00000003"
    _train(m2, o2, s2, 2)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert json.loads((tmp_path / "last.json").read_text())["step"] == 3
    assert set(checkpoint.load_weights(tmp_path)) == set(want)


def test_keeps_the_newest_two_and_falls_back_when_the_pointer_is_stale(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=step, epoch=0, batch=step)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=3, epoch=0, batch=3)  # same step again
    assert checkpoint.last(tmp_path).name == "step-00000003"
    # A crash between renames: last.json names a folder that is gone -> the newest complete folder.
    (tmp_path / "last.json").write_text(json.dumps({"dir": "step-00000009"}))
    assert checkpoint.last(tmp_path).name == "step-00000003"
    (tmp_path / "last.json").unlink()
    assert checkpoint.last(tmp_path).name == "step-00000003"
    assert checkpoint.last(tmp_path / "nowhere") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.parametrize("where", ["weights", "state", "fsync"])
def test_a_failed_write_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch, where):
    model, opt, sched = _setup()
    checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=1, epoch=0, batch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, sched, 1)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    target = {"weights": (checkpoint, "save_file"), "state": (torch, "save"), "fsync": (os, "fsync")}[where]
    monkeypatch.setattr(*target, disk_full)
    with pytest.raises(UserError, match="No space left on device") as e:
        checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=2, epoch=0, batch=2)
    monkeypatch.undo()
    assert "\n" not in str(e.value)
    assert checkpoint.last(tmp_path).name == "step-00000001"
    got = checkpoint.load_weights(tmp_path)
    assert all(torch.equal(got[k], before[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_no_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.load_weights(tmp_path)


def test_a_killed_writers_temp_folder_is_cleaned_by_the_next_save(tmp_path):
    model, opt, sched = _setup()
    checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=1, epoch=0, batch=1)
    torn = tmp_path / ".step-00000002.deadbeef.tmp"  # what SIGKILL mid-save leaves: weights, no state
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.last(tmp_path).name == "step-00000001"  # never mistaken for a checkpoint
    checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=2, epoch=0, batch=2)
    assert not torn.exists() and checkpoint.last(tmp_path).name == "step-00000002"


@pytest.mark.faults
def test_a_corrupt_newest_checkpoint_falls_back_then_fails_with_one_line(tmp_path, capsys):
    from pipeline.errors import UserError

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    ckpts = tmp_path / "checkpoints"
    checkpoint.save(ckpts, model=model, optimizer=opt, scheduler=None, step=1, epoch=0, batch=1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpoint.save(ckpts, model=model, optimizer=opt, scheduler=None, step=2, epoch=0, batch=2)
    assert json.loads((ckpts / "last.json").read_text())["sha256"]["model.safetensors"]
    f = ckpts / "step-00000002" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the weights: safetensors itself would load it silently
    f.write_bytes(bytes(data))
    w = checkpoint.load_weights(tmp_path)
    assert all(torch.equal(w[k], good[k]) for k in good)
    assert "checkpoint step-00000002 is corrupt" in capsys.readouterr().err
    s1 = ckpts / "step-00000001" / "state.pt"
    s1.write_bytes(s1.read_bytes()[:-10])
    with pytest.raises(UserError, match="every checkpoint in .* is corrupt") as e:
        checkpoint.load(tmp_path, model=model)
    assert "\n" not in str(e.value)
