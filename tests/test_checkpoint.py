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


# --- tied weights stored once ---------------------------------------------------------------------
def _tied_decoder(seed=0):
    """A tiny tied CaptionDecoder with its AdamW and a constant schedule."""
    from pipeline.config import DecoderConfig
    from pipeline.model import CaptionDecoder
    from pipeline.training import make_optimizer

    cfg = DecoderConfig(layers=1, width=16, heads=2, mlp_dim=32, vocab_size=40, max_len=6,
                        encoder_width=8, mask_id=39, bos_id=38, eos_id=38, tie_embeddings=True,
                        image_pos_emb=True, image_tokens=3)
    torch.manual_seed(seed)
    model = CaptionDecoder(cfg)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _train_decoder(model, opt, sched, steps):
    for _ in range(steps):  # the batch comes from the torch RNG: restored by the checkpoint
        feats, tokens = torch.randn(4, 3, 8), torch.randint(0, 38, (4, 6))
        mask = torch.ones(4, 6, dtype=torch.bool)
        loss = model.loss(feats, tokens, mask, torch.tensor([True, False, True, False])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _all_copies(model):
    """What checkpoints held before ties were stored once: every state-dict name, its own copy."""
    return {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}, {}


@pytest.mark.parametrize("layout", ["once", "both copies (older checkpoints)"])
def test_tied_weights_are_stored_once_and_resume_exactly(tmp_path, monkeypatch, layout):
    """The [V, D] matrix a tied decoder shares with its logits layer is written once (the header
    names its alias); loading gives every name back and a tied model; a checkpoint written with both
    copies, as before, loads and resumes to the same weights as an uninterrupted run."""
    from safetensors import safe_open

    if layout != "once":
        monkeypatch.setattr(checkpoint, "state_tensors", _all_copies)
    model, opt, sched = _tied_decoder()
    _train_decoder(model, opt, sched, 3)
    path = checkpoint.save(tmp_path, model=model, optimizer=opt, scheduler=sched, step=3, epoch=0,
                           batch=3)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored, header = set(f.keys()), f.metadata()
    names = set(model.state_dict())
    if layout == "once":
        assert stored == names - {"head.weight"}
        assert json.loads(header["aliases"]) == {"head.weight": "tok_emb.weight"}
    else:
        assert stored == names and "aliases" not in header
    _train_decoder(model, opt, sched, 2)  # the uninterrupted continuation
    want = {k: v.clone() for k, v in model.state_dict().items()}

    back, opt2, sched2 = _tied_decoder(seed=1)  # other init: everything comes from the checkpoint
    checkpoint.load(tmp_path, model=back, optimizer=opt2, scheduler=sched2)
    assert back.head.weight is back.tok_emb.weight
    assert set(checkpoint.load_weights(tmp_path)) == names
    _train_decoder(back, opt2, sched2, 2)
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_the_tied_matrix_once_makes_the_file_smaller_by_its_size(tmp_path, monkeypatch):
    model, opt, _ = _tied_decoder()
    once = checkpoint.save(tmp_path / "once", model=model, optimizer=opt, scheduler=None, step=1,
                           epoch=0, batch=1)
    monkeypatch.setattr(checkpoint, "state_tensors", _all_copies)
    both = checkpoint.save(tmp_path / "both", model=model, optimizer=opt, scheduler=None, step=1,
                           epoch=0, batch=1)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    saved = size(both) - size(once)
    matrix = model.tok_emb.weight.numel() * 4  # [V, D] fp32
    assert matrix <= saved < matrix + 200  # the header's own names differ by a few bytes


def test_an_aliases_header_naming_no_stored_tensor_is_one_line(tmp_path):
    from pipeline.checkpoint import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, f, metadata={"aliases": json.dumps({"b": "missing"})})
    with pytest.raises(UserError, match="aliases") as e:
        checkpoint.read_weights(f)
    assert "\n" not in str(e.value)


# --- how many checkpoints a run keeps -------------------------------------------------------------
def _cli(argv: list[str]):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in argv])


def test_keep_checkpoints_through_the_cli(tiny_store, tmp_path, capsys, monkeypatch):
    """`train --keep-checkpoints N` keeps the newest N; a resume may change N; N < 1 is refused."""
    from conftest import TINY_TRAIN, cli_options

    opts = {**TINY_TRAIN, "checkpoint_every": 1, "tie_embeddings": True}
    base = ["train", "--store", tiny_store, "--run", tmp_path / "run", *cli_options(opts)]
    res = _cli([*base, "--max-steps", 3, "--keep-checkpoints", 1])
    assert res.exit_code == 0, (res.output, res.exception)
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.glob("step-*")] == ["step-00000003"]
    res = _cli([*base, "--max-steps", 6, "--keep-checkpoints", 3, "--resume"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in ckpts.glob("step-*")) == [f"step-0000000{s}" for s in (4, 5, 6)]
    # the default run's tie: one copy in each checkpoint and in the best epoch's weights (epoch 1
    # ends at step 6)
    from safetensors import safe_open

    for f in (ckpts / "step-00000006" / "model.safetensors", tmp_path / "run" / "best.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            assert "head.weight" not in h.keys() and "tok_emb.weight" in h.keys(), f
    from test_evaluate import cli_error

    line = cli_error([str(a) for a in (*base, "--keep-checkpoints", 0)], capsys, monkeypatch)
    assert line == "error: --keep-checkpoints must be >= 1 (got 0)"


# --- which weights eval reads ---------------------------------------------------------------------
def test_eval_checkpoint_chooses_the_weights(tiny_run, tmp_path, capsys, monkeypatch):
    """`pipeline eval --checkpoint last | PATH` evaluates those weights and records them in
    eval.json; a name that is none of these, or a named checkpoint whose bytes changed, is one
    line (never another checkpoint instead)."""
    import shutil

    from test_evaluate import cli_error, run_copy

    older, newest = sorted((tiny_run / "checkpoints").glob("step-*"))
    run = run_copy(tiny_run, tmp_path / "run")
    opts = ["--limit", "2", "--zero-shot-limit", "0", "--grid", "0", "--max-new-tokens", "4",
            "--beam-size", "2", "--device", "cpu", "--precision", "fp32"]
    for choice, want in (("last", (run / "checkpoints" / newest.name, "last")),
                         (older, (older, "path"))):
        res = _cli(["eval", "--run", run, "--checkpoint", choice, *opts])
        assert res.exit_code == 0, (res.output, res.exception)
        got = json.loads((run / "eval" / "eval.json").read_text())["checkpoint"]
        assert got == {"dir": str(want[0]), "step": int(want[0].name[5:]), "chosen": want[1]}

    line = cli_error(["eval", "--run", str(run), "--checkpoint", "newest"], capsys, monkeypatch)
    assert line.startswith("error: --checkpoint newest: not best, last, a checkpoint folder")
    bad = tmp_path / "step-00000001"
    shutil.copytree(older, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (bad / "model.safetensors").write_bytes(bytes(data))
    line = cli_error(["eval", "--run", str(run), "--checkpoint", str(bad)], capsys, monkeypatch)
    assert line == (f"error: --checkpoint {bad} is corrupt: model.safetensors does not match its "
                    "recorded sha256")
