"""Early stopping: stops after `patience` validations without improvement, keeps the best epoch's weights,
finds a stopped run finished on rerun, and resumes to the same decisions and weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN
from pipeline.config import TrainConfig
from pipeline.early_stop import EarlyStop, best_checkpoint, val_objective
from pipeline.errors import UserError
from pipeline.runlog import MetricsLog
from stages import train

# Scripted validation losses by epoch (fault injection: the control flow is under test, not validate()):
# the objective improves for two epochs, then gets worse, so patience 2 stops after epoch 4 with epoch 2 best.
SCRIPT = {1: 3.0, 2: 2.5, 3: 2.6, 4: 2.7, 5: 2.0, 6: 1.0}


@pytest.fixture
def scripted_val(monkeypatch):
    calls = []

    def fake(decoder, loader, precision, dist=None):
        calls.append(1)
        epoch = len(calls)
        return {"loss_ar": SCRIPT[epoch], "loss_par": SCRIPT[epoch], "samples": len(loader.positions)}

    monkeypatch.setattr(train, "validate", fake)
    return calls


def _cfg(store, run, **kw):
    base = {**TINY_TRAIN, "schedule": "constant", "warmup_steps": 0, "checkpoint_every": 1000}
    return TrainConfig(store=store, run=run, **{**base, **kw})


def test_unit_state_machine():
    es = EarlyStop(2, 0.75)
    assert [es.update({"kind": "val", "step": s, "loss_ar": v, "loss_par": v}) for s, v in
            [(1, 3.0), (2, 2.5), (3, 2.6)]] == [True, True, False]
    assert es.best == 2.5 and es.best_step == 2 and not es.exhausted
    es.update({"loss_ar": 9.0, "loss_par": 9.0, "step": 4})
    assert es.exhausted
    # rebuilt from records, interrupted ("stop") entries are not epoch ends
    rebuilt = EarlyStop(2, 0.75, [{"kind": "val", "step": 1, "loss_ar": 3.0, "loss_par": 3.0},
                                  {"kind": "val", "step": 2, "loss_ar": 4.0, "loss_par": 4.0, "stop": True}])
    assert rebuilt.best == 3.0 and rebuilt.since == 0
    assert val_objective({"loss_ar": 1.0, "loss_par": 3.0}, 0.75) == pytest.approx(2.5)
    assert val_objective({"loss_ar": 1.0, "loss_par": None}, 0.75) == 1.0


def test_stops_keeps_best_and_rerun_is_done(tiny_store, tmp_path, scripted_val):
    run = tmp_path / "es"
    s = train.run(_cfg(tiny_store, run, epochs=6, patience=2))
    spe = s["total_steps"] // 6
    assert s["steps"] == 4 * spe and s["complete"] and s["early_stopping"]["stopped_early"]
    assert s["early_stopping"]["best_step"] == 2 * spe
    found = best_checkpoint(run)
    assert found is not None and found[1]["step"] == 2 * spe
    # the best weights are the weights after epoch 2: a plain 2-epoch run of the same recipe has them
    ref = tmp_path / "two"
    train.run(_cfg(tiny_store, ref, epochs=2))
    from pipeline.checkpoint import load_weights

    best, want = load_file(str(found[0])), load_weights(ref)
    assert best.keys() == want.keys() and all(torch.equal(best[k], want[k]) for k in best)
    # a rerun finds it finished (nothing trained, no validation run)
    n = len(scripted_val)
    again = train.run(_cfg(tiny_store, run, epochs=6, patience=2, resume=True))
    assert again["steps_this_run"] == 0 and len(scripted_val) == n


def test_resume_mid_run_makes_the_same_decisions(tiny_store, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run, steps in ((whole, [None]), (parts, [7, None])):
        calls = []

        def fake(decoder, loader, precision, dist=None, calls=calls):
            # keyed by how many epoch-end validations the run folder already holds + this one
            done = [e for e in MetricsLog(run / "metrics.jsonl").read() if e["kind"] == "val" and not e.get("stop")]
            v = SCRIPT[len(done) + 1]
            return {"loss_ar": v, "loss_par": v, "samples": len(loader.positions)}

        monkeypatch.setattr(train, "validate", fake)
        for i, ms in enumerate(steps):
            train.run(_cfg(tiny_store, run, epochs=6, patience=2, max_steps=ms, resume=i > 0))
    a, b = best_checkpoint(whole), best_checkpoint(parts)
    assert a[1]["step"] == b[1]["step"]
    wa, wb = load_file(str(a[0])), load_file(str(b[0]))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((parts / "summary.json").read_text())
    assert sa["steps"] == sb["steps"] and sb["early_stopping"]["stopped_early"]


def test_patience_must_not_be_negative(tiny_store, tmp_path):
    with pytest.raises(UserError, match="--patience"):
        train.run(_cfg(tiny_store, tmp_path / "x", patience=-1))
    assert not EarlyStop(0, 0.75, [{"kind": "val", "step": s, "loss_ar": 1.0 + s, "loss_par": 1.0 + s}
                                   for s in range(5)]).exhausted  # 0 = never stop early


def test_cli_recipe_seed_and_explicit_options_win(monkeypatch):
    """`pipeline train --recipe seed --epochs 5`: the seed's values, except what the command line says."""
    from typer.testing import CliRunner

    from pipeline import cli

    seen = []
    monkeypatch.setattr(train, "run", lambda cfg: seen.append(cfg))  # the CLI's wiring is under test here
    r = CliRunner().invoke(cli.app, ["train", "--recipe", "seed", "--epochs", "5", "--no-tie-embeddings"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert (cfg.recipe, cfg.epochs, cfg.lr, cfg.batch_size, cfg.schedule, cfg.patience) == ("seed", 5, 1e-4, 32,
                                                                                           "constant", 0)
    r = CliRunner().invoke(cli.app, ["train"])
    assert r.exit_code == 0 and seen[-1] == TrainConfig()  # no options: the default recipe, as the dataclass says
    r = CliRunner().invoke(cli.app, ["train", "--recipe", "nope"])  # cli.main() makes it one line, exit 2
    assert isinstance(r.exception, UserError) and "unknown --recipe" in str(r.exception)
