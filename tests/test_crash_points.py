"""Crash points, SQLite-style: stop the disk at every store write of a small encode and of an `extend`.

Every byte the store gets goes through zarr's one file-writing function (`zarr.storage._local._put`: write a temp
file, rename it into place). For each N across one encode of 2 shards x 8 rows (tiny random ViT) and one encode
that extends a 1-shard store by a shard:

- "crash at N": write N and every later one fail (EIO), the disk state a kill just before write N leaves;
- "full at N": only write N fails (ENOSPC), the writes after it succeed (a transient full disk);

then a reader opens the store (no exception but our one-line `UserError`; what it reads equals the uninterrupted
store's rows of the shards it sees), and the rerun gives the uninterrupted store bitwise. A few real kills
(`os._exit(9)` at write N, in a CLI run) check that "crash at N" is what a kill leaves.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local as local
from conftest import TINY_ENCODE, store_rows
from test_faults_oserror import same_store

from pipeline.config import EncodeConfig
from pipeline.errors import UserError
from pipeline.status import store_summary
from pipeline.store import FeatureStore
from stages import encode

pytestmark = pytest.mark.faults
ENC = {**TINY_ENCODE, "batch_size": 4}  # 2 batches per shard


def _small_shards(tiny_shards: Path, dst: Path, n_shards: int, rows: int = 8) -> Path:
    """The first `rows` samples of the first `n_shards` tiny shards, with stats files that say so."""
    dst.mkdir(parents=True)
    for name, tar, stats in encode.complete_shards(tiny_shards)[:n_shards]:
        with tarfile.open(tar) as src, tarfile.open(dst / name, "w") as out:
            keys: list[str] = []
            for m in src:
                key = m.name.split(".")[0]
                if key not in keys:
                    keys.append(key)
                if len(keys) > rows:
                    break
                out.addfile(m, src.extractfile(m))
        (dst / f"{tar.stem}_stats.json").write_text(json.dumps({**stats, "count": rows, "successes": rows}))
    return dst


class Disk:
    """zarr's file writes, counted; from write `crash_at` on every write fails, or only write `full_at` does."""

    def __init__(self, crash_at: int | None = None, full_at: int | None = None):
        self.real, self.n, self.crash_at, self.full_at = local._put, 0, crash_at, full_at
        self.lock = threading.Lock()

    def __call__(self, path, value, exclusive=False):
        with self.lock:
            self.n += 1
            k = self.n
        if self.crash_at is not None and k >= self.crash_at:
            raise OSError(errno.EIO, "simulated crash", str(path))
        if k == self.full_at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return self.real(path, value, exclusive=exclusive)


def _reader_check(store: Path, shards: Path, ref: Path) -> None:
    """What a reader sees after the crash: a one-line refusal, or the done shards' rows exactly as in `ref`."""
    store_summary(store, shards)  # `pipeline status` never raises
    try:
        st = FeatureStore.open(store)
        idx = st.index()
        feats = store_rows(st, idx.rows) if len(idx) else None
    except UserError:
        return
    r = FeatureStore.open(ref)
    ridx = r.index()
    pos = {k: i for i, k in enumerate(ridx.keys)}
    assert set(idx.keys) <= set(pos)
    if feats is not None:
        want = store_rows(r, ridx.rows[[pos[k] for k in idx.keys]])
        assert np.array_equal(feats, want)


def _sweep(monkeypatch, cfg: EncodeConfig, ref: Path, total: int, setup, step: int = 1) -> int:
    points = 0
    for mode in ("crash", "full"):
        for n in range(1, total + 1, 1 if mode == "crash" else step):
            setup()
            disk = Disk(crash_at=n) if mode == "crash" else Disk(full_at=n)
            monkeypatch.setattr(local, "_put", disk)
            try:
                encode.run(cfg)
            except UserError as e:
                assert "simulated crash" in str(e) or "No space left" in str(e), (mode, n, e)
            monkeypatch.setattr(local, "_put", disk.real)
            _reader_check(cfg.store, cfg.shards, ref)
            encode.run(cfg)
            same_store(cfg.store, ref)
            points += 1
    return points


def test_every_store_write_of_an_encode_and_an_extend(tiny_shards, tmp_path, monkeypatch):
    import functools
    import shutil

    from pipeline import encoder as enc_mod

    # the same real encoder for every run (building it twice per point would be most of the sweep's time)
    monkeypatch.setattr(enc_mod, "build_encoder", functools.lru_cache(None)(enc_mod.build_encoder))

    two = _small_shards(tiny_shards, tmp_path / "two", 2)
    one = _small_shards(tiny_shards, tmp_path / "one", 1)
    ref = tmp_path / "ref.zarr"
    counter = Disk()
    monkeypatch.setattr(local, "_put", counter)
    encode.run(EncodeConfig(shards=two, store=ref, **ENC))
    monkeypatch.setattr(local, "_put", counter.real)
    encode_writes = counter.n

    store = tmp_path / "s.zarr"
    cfg = EncodeConfig(shards=two, store=store, **ENC)

    def fresh():
        shutil.rmtree(store, ignore_errors=True)

    points = _sweep(monkeypatch, cfg, ref, encode_writes, fresh, step=3)

    # extend: a store of shard 0 only, then the 2-shard folder (arrays grow, the shard list last, shard 1)
    base = tmp_path / "base.zarr"
    encode.run(EncodeConfig(shards=one, store=base, **ENC))
    counter = Disk()

    def from_base():
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(base, store)

    from_base()
    monkeypatch.setattr(local, "_put", counter)
    encode.run(cfg)
    monkeypatch.setattr(local, "_put", counter.real)
    same_store(store, ref)
    extend_writes = counter.n
    points += _sweep(monkeypatch, cfg, ref, extend_writes, from_base, step=3)
    print(f"crash points: encode {encode_writes} writes, extend {extend_writes} writes, {points} points in all")
    assert encode_writes >= 30 and extend_writes >= 10 and points >= 60


_KILL_AT = """
import os, sys, zarr.storage._local as L
real, n = L._put, [0]
def put(path, value, exclusive=False):
    n[0] += 1
    if n[0] == {n}:
        os._exit(9)
    return real(path, value, exclusive=exclusive)
L._put = put
from pipeline.cli import main
sys.argv = ["pipeline", *{args!r}]
main()
"""


@pytest.mark.parametrize("n", [5, 25])
def test_a_real_kill_at_write_n_then_rerun_is_bitwise(tiny_shards, tmp_path, n):
    """os._exit(9) at write N of a CLI encode (in the create, in the shard writes): the rerun is
    bitwise equal, and the reader never sees a traceback in between."""
    two = _small_shards(tiny_shards, tmp_path / "two", 2)
    ref = tmp_path / "ref.zarr"
    encode.run(EncodeConfig(shards=two, store=ref, **ENC))
    store = tmp_path / "s.zarr"
    args = ["encode", "--shards", str(two), "--store", str(store)]
    for k, v in ENC.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-c", _KILL_AT.format(n=n, args=args)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 9, p.stderr[-2000:]
    _reader_check(store, two, ref)
    encode.run(EncodeConfig(shards=two, store=store, **ENC))
    same_store(store, ref)


# --- checkpoint save ------------------------------------------------------------------------------------------------
class _Crash(BaseException):
    """Stands for the process dying: no `except OSError` (or Exception) handler sees it."""


def _ckpt_state(seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _save_two(ckpt_dir: Path, model, opt, disk=None) -> None:
    """Checkpoint step 1, one optimizer step, then step 2 (the save under test when `disk` is given)."""
    import torch

    from pipeline import checkpoint

    torch.manual_seed(0)
    checkpoint.save(ckpt_dir, model=model, optimizer=opt, scheduler=None, step=1, epoch=0, batch=1)
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    if disk is not None:
        disk.armed = True
    checkpoint.save(ckpt_dir, model=model, optimizer=opt, scheduler=None, step=2, epoch=0, batch=2)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


class _CkptDisk:
    """Counts the mutating file operations of `checkpoint.save` (mkdir, file writes, renames, the pointer write) once
    armed; op `crash_at` and every later one raise _Crash, or only op `full_at` raises ENOSPC."""

    def __init__(self, monkeypatch, crash_at=None, full_at=None):
        from pipeline import checkpoint

        self.n, self.armed, self.crash_at, self.full_at = 0, False, crash_at, full_at
        for owner, name in ((checkpoint, "_write_bytes"), (checkpoint, "atomic_write_text"), (checkpoint.os, "replace"),
                            (Path, "mkdir")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def op(*a, **k):
            if self.armed:
                self.n += 1
                if self.crash_at is not None and self.n >= self.crash_at:
                    raise _Crash(self.n)
                if self.full_at == self.n:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        return op


def test_checkpoint_save_crash_at_every_write(tmp_path, monkeypatch):
    import torch

    from pipeline import checkpoint

    ref_dir = tmp_path / "ref"
    with monkeypatch.context() as m:  # the uninterrupted save, and how many operations it makes
        counter = _CkptDisk(m)
        model, opt = _ckpt_state(0)
        _save_two(ref_dir, model, opt, counter)
    total = counter.n
    assert total >= 8  # mkdir, three files, rename, pointer (temp + rename), ...
    ref = _tree(ref_dir)
    weights = {1: None, 2: {k: v.clone() for k, v in model.state_dict().items()}}
    model1, _ = _ckpt_state(0)
    weights[1] = {k: v.clone() for k, v in model1.state_dict().items()}
    points = 0
    for mode in ("crash", "full"):
        for n in range(1, total + 1):
            d = tmp_path / f"{mode}{n}"
            model, opt = _ckpt_state(0)
            with monkeypatch.context() as m:
                disk = _CkptDisk(m, **({"crash_at": n} if mode == "crash" else {"full_at": n}))
                try:
                    _save_two(d, model, opt, disk)
                except _Crash:
                    assert mode == "crash"
                except UserError as e:  # a full disk: one line, the previous checkpoint intact
                    assert mode == "full" and "\n" not in str(e) and "No space left" in str(e)
            points += 1
            # a reader: the newest complete checkpoint is step 1 or 2, and its weights are that step's exactly
            found = checkpoint.last(d)
            assert found is not None and found.name in ("step-00000001", "step-00000002"), (mode, n)
            step = int(found.name[-1])
            got = checkpoint.load_weights(d)
            assert all(torch.equal(got[k], weights[step][k]) for k in got), (mode, n)
            # the rerun (the same save again) gives the uninterrupted result bitwise, with no leftovers
            checkpoint.save(d, model=model, optimizer=opt, scheduler=None, step=2, epoch=0, batch=2)
            assert _tree(d) == ref, (mode, n)
    assert points == 2 * total
