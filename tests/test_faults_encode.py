"""Fault injection, encode: torn tars and corrupt images are skipped and recorded, never costing other shards.

Already covered elsewhere (not repeated here): `kill -9` mid-encode + rerun is bitwise equal to an
uninterrupted store (tests/test_encode.py::test_kill9_and_resume_is_bitwise); a second encoder on a locked
store refuses (tests/test_encode.py::test_other_encoder_refused_lock_and_overwrite).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ENCODE, store_rows

from pipeline.config import EncodeConfig
from pipeline.errors import UserError
from pipeline.status import store_summary
from pipeline.store import FeatureStore
from stages import encode

pytestmark = pytest.mark.faults


def _members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf]


def _write_tar(path: Path, members) -> None:
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))


def _with_stats(src: Path, dst: Path) -> None:
    shutil.copy(src.with_name(f"{src.stem}_stats.json"), dst.with_name(f"{dst.stem}_stats.json"))


@pytest.fixture
def broken_shards(tiny_shards, tmp_path):
    """00000 intact, 00001 with one corrupt JPEG, 00002 torn mid-member, 00003 = 00000 cut at a member boundary.

    Every stats file is img2dataset's own: the folder looks finished, as after a bad copy or a full disk.
    Returns (folder, key of the corrupt image, the original 00002.tar).
    """
    (n0, t0, _), (n1, t1, _), (n2, t2, _) = encode.complete_shards(tiny_shards)
    d = tmp_path / "shards"
    d.mkdir()
    shutil.copy(t0, d / n0)
    _with_stats(t0, d / n0)
    members = _members(t1)
    bad = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg"))
    members[bad] = (members[bad][0], b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(300))
    members[bad][0].size = len(members[bad][1])
    _write_tar(d / n1, members)
    _with_stats(t1, d / n1)
    data = t2.read_bytes()
    (d / n2).write_bytes(data[: len(data) // 2])
    _with_stats(t2, d / n2)
    cut = [m for m, _ in _members(t0) if m.name.endswith(".jpg")][10].offset  # the 11th sample's first header
    (d / "00003.tar").write_bytes(t0.read_bytes()[:cut])
    _with_stats(t0, d / "00003.tar")
    return d, Path(members[bad][0].name).stem, t2


def test_torn_tars_and_a_corrupt_image_are_skipped_and_recorded(broken_shards, tiny_store, tmp_path):
    shards, bad_key, original = broken_shards
    store = tmp_path / "features.zarr"
    with pytest.raises(UserError) as e:
        encode.run(EncodeConfig(shards=shards, store=store, **TINY_ENCODE))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 shard(s) could not be read and were skipped: 00002.tar (ReadError: ")
    assert "; 00003.tar (EOFError: " in msg and "_stats.json" in msg  # what happened, what to do

    st, ref = FeatureStore.open(store), FeatureStore.open(tiny_store)
    assert st.shards == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert st.shard_done().tolist() == [True, True, False, False]  # a torn shard is never half written
    problems = st.attrs["problems"]
    assert set(problems["unreadable_shards"]) == {"00002.tar", "00003.tar"}
    want_n = json.loads((shards / "00003_stats.json").read_text())["successes"]
    assert problems["unreadable_shards"]["00003.tar"] == \
        f"EOFError: the tar holds 10 samples, its stats file says {want_n}"  # cut between two samples
    assert list(problems["skipped_images"]) == ["00001.tar"]
    assert list(problems["skipped_images"]["00001.tar"]) == [bad_key]

    got, want = st.index(), ref.index()
    c = st.shard_capacity
    in0 = want.rows < c
    np.testing.assert_array_equal(st.read(0, c), ref.read(0, c))  # the intact shard: bitwise
    assert got.keys[: int(in0.sum())] == [k for k, m in zip(want.keys, in0) if m]
    ref1 = [k for k, r in zip(want.keys, want.rows) if c <= r < 2 * c]
    got1 = [k for k, r in zip(got.keys, got.rows) if c <= r < 2 * c]
    assert got1 == [k for k in ref1 if k != bad_key]  # every other sample of the shard is there, in order
    pos = {k: r for k, r in zip(want.keys, want.rows)}
    rows1 = [r for k, r in zip(got.keys, got.rows) if c <= r < 2 * c]
    np.testing.assert_allclose(store_rows(st, rows1).astype(np.float32),
                               store_rows(ref, [pos[k] for k in got1]).astype(np.float32), atol=2e-3, rtol=1e-2)

    s = store_summary(store, shards)  # status shows the gap
    assert s["shards_done"] == 2 and s["coverage"] < 1

    # the user fetches the torn shards again: a rerun encodes only them and clears their record
    shutil.copy(original, shards / "00002.tar")
    (shards / "00003.tar").unlink()
    (shards / "00003_stats.json").unlink()
    summary = encode.run(EncodeConfig(shards=shards, store=store, **TINY_ENCODE))
    assert summary["shards_encoded"] == 1
    st = FeatureStore.open(store)
    assert st.shard_done().tolist() == [True, True, True, False]
    assert st.attrs["problems"]["unreadable_shards"] == {"00003.tar": problems["unreadable_shards"]["00003.tar"]}
    np.testing.assert_array_equal(st.read(2 * c, 3 * c), ref.read(2 * c, 3 * c))  # bitwise, as if never torn


def test_skipped_images_are_recorded_when_their_shard_is_done(broken_shards, tmp_path):
    """Killed right after the shard with a corrupt image is marked done: its `problems` entry is already there."""
    import os
    import subprocess
    import sys

    src, bad_key, _ = broken_shards
    shards = tmp_path / "two"
    shards.mkdir()
    for n in ("00000", "00001"):
        shutil.copy(src / f"{n}.tar", shards / f"{n}.tar")
        shutil.copy(src / f"{n}_stats.json", shards / f"{n}_stats.json")
    store = tmp_path / "features.zarr"
    code = ("import sys; from pathlib import Path; from pipeline.config import EncodeConfig; from stages import encode; "
            f"encode.run(EncodeConfig(shards=Path(sys.argv[1]), store=Path(sys.argv[2]), **{TINY_ENCODE!r}))")
    env = {**os.environ, "PIPELINE_TEST_KILL": "shard:2", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(shards), str(store)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    st = FeatureStore.open(store)
    assert st.shard_done().tolist() == [True, True]
    assert list(st.attrs["problems"]["skipped_images"]["00001.tar"]) == [bad_key]
