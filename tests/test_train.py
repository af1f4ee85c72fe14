"""The train stage on the tiny store: it learns, resumes exactly, runs DDP, and refuses what it cannot do."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline import run as run_record, trained_run
from pipeline import training
from stages import train
from conftest import PRECISIONS, TINY_TRAIN, cli_options, store_rows

TIMING = {"samples_per_s"}  # the only fields allowed to differ between two identical runs


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_learns_and_leaves_a_complete_run_folder(tiny_run, tiny_store):
    from pipeline.model import CaptionDecoder
    from pipeline.store import FeatureStore

    m = _metrics(tiny_run)
    tr = [e for e in m if e["kind"] == "train"]
    val = [e for e in m if e["kind"] == "val"]
    assert abs(tr[0]["loss"] - math.log(50258)) < 0.6  # zero-initialised head: ln V at the start
    assert tr[-1]["loss"] < 0.6 * tr[0]["loss"]
    assert [e["epoch"] for e in val] == list(range(8))  # one validation per epoch, both modes
    assert val[-1]["loss_ar"] < 0.6 * val[0]["loss_ar"] and val[-1]["loss_par"] < 0.6 * val[0]["loss_par"]

    cfg = json.loads((tiny_run / "config.json").read_text())
    store = FeatureStore.open(tiny_store)
    assert cfg["store"]["encoder"] == store.encoder and cfg["encoder_random_init"] is True
    assert cfg["tokenizer"]["name"] == "gpt2" and cfg["train"]["epochs"] == 8
    assert cfg["split"]["train"] + cfg["split"]["val"] == len(store.index())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["complete"] and summary["samples_per_s"] > 0 and summary["steps"] == tr[-1]["step"]
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    last = checkpoint.last(tiny_run / "checkpoints")
    assert last.name == f"step-{summary['steps']:08d}"
    model = CaptionDecoder(trained_run.decoder_of(cfg))
    model.load_state_dict(checkpoint.load_weights(tiny_run))  # what eval loads: every key, right shapes


def test_overfits_a_handful_of_captions(tiny_store, tmp_path):
    """8 images with their captions (cut to 11 tokens + EOS), 40 times over: the decoder memorises them."""
    import numpy as np

    from pipeline.store import FeatureStore

    src = FeatureStore.open(tiny_store)
    idx = src.index()
    k, rep = 8, 40
    sel = np.tile(np.arange(k), rep)
    st = FeatureStore.create(tmp_path / "handful.zarr", encoder=src.encoder, tokens=src.tokens, width=src.width,
                             shard_capacity=k * rep, shards=["00000"])
    st.write_shard(0, store_rows(src, idx.rows[:k])[sel], [f"h{i:03d}" for i in range(k * rep)],
                   [idx.captions[i] for i in sel], [idx.meta[i] for i in sel])
    # A quarter parallel rows: AR rows memorise fastest, and the parallel rows must still learn a lot.
    train.run(TrainConfig(**{**TINY_TRAIN, "log_every": 8, "checkpoint_every": 1000}, store=tmp_path / "handful.zarr",
                          run=tmp_path / "run", epochs=4, max_len=12, val_fraction=0.0, parallel_fraction=0.25))
    tr = [e for e in _metrics(tmp_path / "run") if e["kind"] == "train"]
    assert tr[-1]["step"] == 80
    assert tr[-1]["loss_ar"] < 1.5 and tr[-1]["loss_par"] < 0.35 * tr[0]["loss_par"], tr[-1]


def _cfg(store, run, **kw):
    base = dict(TINY_TRAIN, store=store, run=run, epochs=3, schedule="cosine", warmup_steps=2, log_every=3,
                checkpoint_every=4, features="memory")
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_store, tmp_path, capsys):
    straight = train.run(_cfg(tiny_store, tmp_path / "a", max_steps=11))
    train.run(_cfg(tiny_store, tmp_path / "b", max_steps=5))  # interrupted mid-epoch, mid-log-interval
    assert "RANDOM-INIT" in capsys.readouterr().err  # the visible warning for a random-init encoder
    # ... and resumed streaming its features in small shuffle groups: the data order is the run's, not the mode's.
    resumed = train.run(_cfg(tiny_store, tmp_path / "b", max_steps=11, resume=True, features="stream",
                             stream_buffer_slabs=1))
    assert resumed["steps_this_run"] == 6 and straight["steps"] == resumed["steps"] == 11

    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert any(e["kind"] == "val" and not e.get("stop") for e in a)  # an epoch boundary was crossed
    assert a == b
    wa, wb = checkpoint.load_weights(tmp_path / "a"), checkpoint.load_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(checkpoint.last(tmp_path / "a" / "checkpoints") / "state.pt", weights_only=True)
    sb = torch.load(checkpoint.last(tmp_path / "b" / "checkpoints") / "state.pt", weights_only=True)
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    # Resuming a finished run does nothing and keeps its metrics and the summary of the run that trained.
    summary = (tmp_path / "b" / "summary.json").read_bytes()
    again = train.run(_cfg(tiny_store, tmp_path / "b", max_steps=11, resume=True))
    assert again["steps_this_run"] == 0 and _metrics(tmp_path / "b") == b
    assert (tmp_path / "b" / "summary.json").read_bytes() == summary


# A few steps of batch 8 on captions cut to 12 tokens: affordable in bf16 even on an AVX2-only CPU (~300x slower
# than fp32 there), where every step of the 50,258-way head is a bf16 matmul.
SMALL = dict(batch_size=8, max_len=12, log_every=1, checkpoint_every=100, features="memory", warmup_steps=0,
             schedule="constant")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resume_is_exact_in_each_precision(precision, tiny_store, tmp_path):
    straight = train.run(_cfg(tiny_store, tmp_path / "a", max_steps=4, precision=precision, **SMALL))
    train.run(_cfg(tiny_store, tmp_path / "b", max_steps=2, precision=precision, **SMALL))
    resumed = train.run(_cfg(tiny_store, tmp_path / "b", max_steps=4, precision=precision, resume=True, **SMALL))
    assert straight["precision"] == resumed["precision"] == precision and resumed["steps_this_run"] == 2
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    wa, wb = checkpoint.load_weights(tmp_path / "a"), checkpoint.load_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_training_tracks_fp32(tiny_store, tmp_path):
    """bf16 autocast follows the fp32 run step by step: the same zero-head start (ln V, exactly), then losses
    within a few bf16 epsilons (rounding compounds over the steps: 4 eps = 3%)."""
    from pipeline.devices import precision_rtol

    runs = {}
    for p in PRECISIONS:
        train.run(_cfg(tiny_store, tmp_path / p, max_steps=3, precision=p, **SMALL))
        runs[p] = _metrics(tmp_path / p)
    a, b = ([e for e in runs[p] if e["kind"] == "train"] for p in PRECISIONS)
    assert [e["step"] for e in a] == [e["step"] for e in b] == [1, 2, 3]
    assert b[0]["loss"] == pytest.approx(math.log(50258), rel=precision_rtol("bf16"))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=4 * precision_rtol("bf16")), (x, y)
    assert any(x["loss"] != y["loss"] for x, y in zip(a, b))  # it really ran in another precision


def test_refusals_are_one_line_and_touch_nothing(tiny_run, tiny_store, tmp_path):
    before = {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()}
    cfg = json.loads((tiny_run / "config.json").read_text())["train"]
    same = dict(TINY_TRAIN, store=tiny_store, run=tiny_run, epochs=cfg["epochs"])
    with pytest.raises(UserError, match="already holds a run") as e1:
        train.run(TrainConfig(**same))
    with pytest.raises(UserError, match="lr=0.003") as e2:
        train.run(TrainConfig(**{**same, "lr": 1e-3, "resume": True}))
    with pytest.raises(UserError, match="max_len=77") as e3:
        train.run(TrainConfig(**{**same, "max_len": 40, "resume": True}))
    with pytest.raises(UserError, match="does not exist") as e4:
        train.run(TrainConfig(**{**same, "store": tmp_path / "missing.zarr"}))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to the run folder") as e5:
        train.run(TrainConfig(**{**same, "run": blocker / "run"}))
    with pytest.raises(UserError, match="not divisible"):
        train.run(TrainConfig(**{**same, "heads": 3}))
    for e in (e1, e2, e3, e4, e5):
        assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in tiny_run.rglob("*") if p.is_file()} == before


def test_resume_checks_store_provenance():
    old = {"train": {"lr": 1.0, "store": "a"}, "decoder": {}, "tokenizer": {},
           "store": {"encoder": {"model": "m", "weights": {"kind": "hub"}}, "data_digest": "x", "samples": 5}}
    run_record.check_resume(old, {**old, "train": {"lr": 1.0, "store": "moved"}})  # a moved store is the same store
    with pytest.raises(UserError, match="another encoder"):
        run_record.check_resume(old, {**old, "store": {**old["store"], "encoder": {"model": "m2"}}})
    with pytest.raises(UserError, match="samples changed"):
        run_record.check_resume(old, {**old, "store": {**old["store"], "data_digest": "y", "samples": 6}})
    # a run recorded before --image-pos-emb existed trained without image positions: it resumes without them
    run_record.check_resume(old, {**old, "train": {**old["train"], "image_pos_emb": False}})
    with pytest.raises(UserError, match="image_pos_emb=False, now True"):
        run_record.check_resume(old, {**old, "train": {**old["train"], "image_pos_emb": True}})


def test_old_decoder_records_load_and_resume_as_they_trained():
    """config.json's `decoder` from before tied embeddings and image positions had one name each: no
    `tie_embeddings` key trained untied, `image_positions` P (or None) is image_pos_emb with P tokens."""
    from pipeline.config import DecoderConfig, TrainConfig, decoder_config

    old = {"decoder": {"layers": 2, "image_positions": 197}}
    dec = trained_run.decoder_of(old)
    assert (dec.layers, dec.tie_embeddings, dec.image_pos_emb, dec.image_tokens) == (2, False, True, 197)
    none = trained_run.decoder_of({"decoder": {"image_positions": None, "tie_embeddings": True}})
    assert (none.tie_embeddings, none.image_pos_emb, none.image_tokens) == (True, False, None)
    assert trained_run.decoder_of({"decoder": {}}).image_pos_emb is False
    # such a run resumes under today's TrainConfig that derives the same decoder
    new = decoder_config(TrainConfig(tie_embeddings=False, image_pos_emb=False), 197, 768)
    was = {k: v for k, v in dataclasses.asdict(new).items() if k not in ("tie_embeddings", "image_pos_emb",
                                                                          "image_tokens")}
    rec = {"train": {}, "tokenizer": {}, "store": {"encoder": {}, "data_digest": "x"}}
    run_record.check_resume({**rec, "decoder": {**was, "image_positions": None}},
                            {**rec, "decoder": dataclasses.asdict(new)})
    with pytest.raises(UserError, match="decoder config differs"):
        run_record.check_resume({**rec, "decoder": {**was, "image_positions": 197}},
                                {**rec, "decoder": dataclasses.asdict(new)})
    assert DecoderConfig.tie_embeddings is TrainConfig.tie_embeddings  # one default


def test_cli_missing_store_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--store", str(tmp_path / "none.zarr"),
                        "--run", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_ddp_two_gloo_processes_match_one_process(tiny_store, tmp_path):
    args = dict(max_steps=4, features="memory", log_every=1, checkpoint_every=100)
    one = train.run(_cfg(tiny_store, tmp_path / "one", **args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline", "train", "--store", str(tiny_store), "--run-dir", str(tmp_path / "two")]
    cmd += cli_options({**TINY_TRAIN, "epochs": 3, "schedule": "cosine", "warmup_steps": 2, **args})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(m1) == len(m2)  # only rank 0 writes
    for a, b in zip(m1, m2):
        for k in ("loss", "loss_ar", "loss_par"):
            if a.get(k) is not None:
                assert b[k] == pytest.approx(a[k], rel=2e-4), (a, b)  # the exact global token mean, per step
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert one["world_size"] == 1


def test_status_reports_runs_without_torch(tiny_run):
    from rich.console import Console

    from pipeline import status

    s = status.runs_summary(tiny_run.parent)
    (run,) = [r for r in s["runs"] if r["name"] == tiny_run.name]
    m = _metrics(tiny_run)
    last_train = [e for e in m if e["kind"] == "train"][-1]
    last_val = [e for e in m if e["kind"] == "val"][-1]
    assert run["step"] == last_train["step"] and run["epochs_done"] == 8 and run["epochs"] == 8
    assert run["train_loss_ar"] == last_train["loss_ar"] and run["val_loss_par"] == last_val["loss_par"]
    assert run["checkpoint"] == checkpoint.last(tiny_run / "checkpoints").name and run["random_init"] is True
    console = Console(record=True, width=200)
    status.render_runs(console, s)
    text = console.export_text()
    assert tiny_run.name in text and "random" in text
    narrow = Console(record=True, width=80)  # a default terminal: the run's name and its encoder stay whole
    status.render_runs(narrow, s)
    row = [ln for ln in narrow.export_text().splitlines() if ln.strip().startswith(tiny_run.name[:16])]
    assert row and "random" in row[0], narrow.export_text()
    code = ("import sys; from pathlib import Path; from pipeline import status; "
            f"status.runs_summary(Path({str(tiny_run.parent)!r})); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lr_schedule_warmup_then_constant_or_cosine():
    const = training.lr_factor(TrainConfig(warmup_steps=4, schedule="constant"), 20)
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = training.lr_factor(TrainConfig(warmup_steps=4, schedule="cosine"), 20)
    assert cos(3) == 1.0 and cos(4) == 1.0 and cos(12) == pytest.approx(0.5) and cos(20) == pytest.approx(0.0)
    assert all(cos(s) >= cos(s + 1) for s in range(4, 20))
