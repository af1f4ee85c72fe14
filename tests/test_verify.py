"""Checked bytes: crc32c on features chunks, missing chunks of done shards, `pipeline verify` on a store and a run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import store_rows
from pipeline import checkpoint, verify
from pipeline.errors import UserError
from pipeline.store import FeatureStore

pytestmark = pytest.mark.faults
T, E, C = 5, 8, 6
ENC = {"model": "toy", "weights": {"kind": "random-init", "seed": 0}}


def _store(path, shards=("a", "b")):
    rng = np.random.default_rng(0)
    st = FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C, shards=list(shards), chunk_rows=3)
    for s in range(len(shards)):
        n = 5
        st.write_shard(s, rng.standard_normal((n, T, E)).astype(np.float16), [f"{s}-{i}" for i in range(n)],
                       ["cap"] * n, [""] * n)
    return st


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", "verify", *args], capture_output=True, text=True,
                          timeout=120)


def test_a_flipped_bit_or_a_missing_chunk_names_its_shard(tmp_path):
    path = tmp_path / "f.zarr"
    st = _store(path)
    assert st.has_checksums
    chunk = st._chunk_file("features", (2, 0, 0))  # rows 6-8: shard b
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = FeatureStore.open(path)
    with pytest.raises(UserError, match="shard b is corrupt") as e:
        store_rows(r, r.index().rows)
    assert "\n" not in str(e.value)
    np.testing.assert_array_equal(r.read(0, 6).shape, (6, T, E))  # shard a still reads
    p = _cli("--store", str(path))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "shard b: features chunk checksum mismatch" in p.stderr
    chunk.unlink()  # now missing: zarr alone would read zeros
    with pytest.raises(UserError, match="shard\\(s\\) b are marked done but miss features chunks"):
        FeatureStore.open(path).index()
    assert verify.verify_store(path)["problems"] == {"b": "1 features chunk(s) missing on disk"}


def test_an_old_store_without_checksums_still_opens(tmp_path):
    import zarr

    path = tmp_path / "old.zarr"
    _store(path)
    g = zarr.open_group(str(path), mode="r+")
    feats = np.asarray(g["features"][:])
    del g["features"]  # rebuilt the way stores were made before crc32c (no compressor at all)
    a = g.create_array("features", shape=feats.shape, chunks=(3, T, E), dtype="float16", fill_value=0,
                       compressors=None)
    a[:] = feats
    st = FeatureStore.open(path)
    assert not st.has_checksums and len(st.index()) == 10
    p = _cli("--store", str(path))
    assert p.returncode == 0 and "no checksums" in p.stderr, p.stderr


def test_verify_a_run_folder(tmp_path):
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for s in (1, 2):
        checkpoint.save(run / "checkpoints", model=model, optimizer=opt, scheduler=None, step=s, epoch=0, batch=s)
    (run / "config.json").write_text('{"train": {}, "decoder": {}, "tokenizer": {}, "store": {}}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert _cli("--run", str(run)).returncode == 0  # a torn last line is what a kill leaves: not a problem
    state = run / "checkpoints" / "step-00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:-1] + b"x")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2}\n')
    p = _cli("--run", str(run))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "step-00000002: state.pt does not match its recorded sha256" in p.stderr
    assert "metrics.jsonl:1: not strict JSON" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error:")
