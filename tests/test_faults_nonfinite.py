"""Fault injection, train: a NaN/inf loss or gradient is never applied, never checkpointed, never logged as NaN.

Two faults: a store row of `inf` (bad data) and a loss patched to return NaN at step 3 (a blown-up model).
Training stops with one line naming the step and the batch's keys; the newest checkpoint is a finite one
(the state before the bad step), no finite checkpoint is pruned, and metrics.jsonl stays strict JSON.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.store import FeatureStore
from pipeline import training
from stages import train

pytestmark = pytest.mark.faults
RECIPE = dict(TINY_TRAIN, epochs=1, checkpoint_every=1, log_every=1)


def _strict_lines(path) -> list[dict]:
    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _finite_checkpoints(run) -> list[int]:
    out = []
    for p in sorted((run / "checkpoints").glob("step-*")):
        w = checkpoint.load_weights(p)
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point()), p.name
        out.append(int(p.name.split("-")[1]))
    return out


def test_nan_loss_at_step_3_is_not_applied(tiny_store, tmp_path, monkeypatch):
    real, calls = training.objective, {"n": 0}

    def objective(sums, b, world):
        calls["n"] += 1
        loss = real(sums, b, world)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training, "objective", objective)
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.run(TrainConfig(store=tiny_store, run=run, **RECIPE))
    msg = str(e.value)
    assert "\n" not in msg and "non-finite" in msg and "step 3" in msg and "keys" in msg
    assert checkpoint.last(run / "checkpoints").name == "step-00000002"  # the state before the bad step
    assert _finite_checkpoints(run) == [1, 2]
    entries = _strict_lines(run / "metrics.jsonl")
    assert [e["step"] for e in entries if e["kind"] == "train"] == [1, 2]
    # --resume meets the same bad step again (deterministic), and again refuses it
    monkeypatch.setattr(training, "objective", real)
    summary = train.run(TrainConfig(store=tiny_store, run=run, resume=True, **RECIPE))
    assert summary["complete"]  # with the fault gone it continues from the finite checkpoint


def test_a_store_row_of_inf_stops_naming_its_key(tiny_store, tmp_path):
    store = tmp_path / "features.zarr"
    shutil.copytree(tiny_store, store)
    st = FeatureStore.open_for_write(store)
    index = st.index()
    from pipeline.loader import split_positions

    train_pos, _ = split_positions(index.keys, TrainConfig.val_fraction)
    bad = int(train_pos[len(train_pos) // 2])
    row = int(index.rows[bad])
    st.group["features"][row] = np.full((st.tokens, st.width), np.inf, dtype=np.float16)
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train.run(TrainConfig(store=store, run=run, **RECIPE))
    msg = str(e.value)
    assert "\n" not in msg and "non-finite" in msg and index.keys[bad] in msg
    step = int(msg.split("step ")[1].split()[0].strip(":,"))
    last = checkpoint.last(run / "checkpoints")
    if step > 1:
        assert last is not None and int(last.name.split("-")[1]) == step - 1
    assert _finite_checkpoints(run) == [s for s in range(max(1, step - 2), step)]
    for e in _strict_lines(run / "metrics.jsonl"):
        assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in e.values())


def test_prune_never_drops_the_last_finite_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpts = tmp_path / "checkpoints"
    checkpoint.save(ckpts, model=model, optimizer=opt, scheduler=None, step=1, epoch=0, batch=1)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    for s in (2, 3, 4):
        checkpoint.save(ckpts, model=model, optimizer=opt, scheduler=None, step=s, epoch=0, batch=s)
    names = sorted(p.name for p in ckpts.glob("step-*"))
    assert "step-00000001" in names and names[-2:] == ["step-00000003", "step-00000004"]
