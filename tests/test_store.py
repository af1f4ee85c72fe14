"""The zarr feature store on random arrays: layout, done markers, extend, reads, lock, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.store import FeatureStore, StoreLock, chunk_rows_for

T, E, C = 5, 8, 6
ENC = {"model": "toy", "weights": {"kind": "random-init", "seed": 0}}


def _shard(rng, n, tag):
    feats = rng.standard_normal((n, T, E)).astype(np.float16)
    keys = [f"{tag}{i:03d}" for i in range(n)]
    caps = [f"caption é {tag} {i}" for i in range(n)]
    meta = [json.dumps({"key": k}) for k in keys]
    return feats, keys, caps, meta


def test_write_read_index_extend(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "f.zarr"
    st = FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C,
                             shards=["a", "b"],
                             chunk_rows=3)
    with pytest.raises(UserError, match="no finished shard"):
        FeatureStore.open(path)
    a = _shard(rng, 4, "a")
    b = _shard(rng, 6, "b")
    st.write_shard(1, *b)  # out of order on purpose: regions are fixed by position
    r = FeatureStore.open(path)
    assert r.index().keys == b[1]
    assert list(r.index().rows) == list(range(6, 12))
    st.write_shard(0, *a)

    r = FeatureStore.open(path)
    assert r.tokens == T and r.width == E and r.is_random_init and r.encoder == ENC
    idx = r.index()
    assert list(idx.rows) == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert idx.keys == a[1] + b[1] and idx.captions == a[2] + b[2] and idx.meta == a[3] + b[3]
    allf = np.concatenate([a[0], b[0]])
    assert r.read(0, 4).dtype == np.float16 and r.read(0, 4).shape == (4, T, E)
    np.testing.assert_array_equal(r.read(6, 12), b[0])
    np.testing.assert_array_equal(r.read(4, 6), 0)  # padding rows are zeros
    # the index's rows are the written ones
    np.testing.assert_array_equal(r.read(0, 12)[idx.rows], allf)
    assert r.read(3, 3).shape == (0, T, E)
    assert r.shard_counts() == {"a": 4, "b": 6}

    # a larger fetch: new shards are appended after the old ones, old rows untouched
    st = FeatureStore.open_for_write(path)
    assert st.extend(["c"]) == [2]
    c = _shard(rng, 2, "c")
    r = FeatureStore.open(path)
    assert r.shard_counts() == {"a": 4, "b": 6, "c": 0} and len(r.index()) == 10
    st.write_shard(2, *c)
    r = FeatureStore.open(path)
    assert r.index().keys == a[1] + b[1] + c[1]
    np.testing.assert_array_equal(r.read(12, 14), c[0])
    assert r.size_bytes() > 0


def test_rewrite_is_bitwise_and_overwrite(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "f.zarr"
    st = FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C, shards=["a"])
    a = _shard(rng, 5, "a")
    st.write_shard(0, *_shard(rng, 6, "x"))  # a half-remembered earlier attempt with more rows
    st.write_shard(0, *a)
    files = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    p2 = tmp_path / "g.zarr"
    FeatureStore.create(p2, encoder=ENC, tokens=T, width=E, shard_capacity=C,
                        shards=["a"]).write_shard(0, *a)
    files2 = {p.relative_to(p2): p.read_bytes() for p in sorted(p2.rglob("*")) if p.is_file()}
    assert files == files2
    with pytest.raises(UserError, match="--overwrite"):
        FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C, shards=["a"])
    st = FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C, shards=["z"],
                             overwrite=True)
    assert st.shards == ["z"] and not st.shard_done().any()


def test_open_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        FeatureStore.open(tmp_path / "nope.zarr")
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="not"):
        FeatureStore.open(tmp_path / "junk")
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(UserError, match="not a cappa feature store"):
        FeatureStore.open(tmp_path / "other.zarr")
    r = FeatureStore.create(tmp_path / "f.zarr", encoder=ENC, tokens=T, width=E, shard_capacity=C,
                            shards=["a"])
    ro = FeatureStore.open(r.path, require_done=False)
    with pytest.raises(RuntimeError):
        ro.write_shard(0, *_shard(np.random.default_rng(0), 1, "a"))


def test_chunk_rows_divides_capacity():
    assert chunk_rows_for(256, 197, 768) == 8  # 2.4 MB chunks for ViT-B/16
    assert 256 % chunk_rows_for(256, 197, 192) == 0
    assert chunk_rows_for(5, 197, 192) == 5


def test_lock_refuses_live_and_takes_stale(tmp_path):
    store = tmp_path / "f.zarr"
    with StoreLock(store):
        with pytest.raises(UserError, match="another encoder"):
            StoreLock(store).acquire()
    # a writer killed without releasing: its pid is gone, so the lock is stale (no process has a pid
    # above the kernel's pid_max)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    import socket

    lock = StoreLock(store)
    lock.path.write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


@pytest.mark.faults
def test_overwrite_deletes_only_a_cappa_store(tmp_path):
    """`--overwrite` on a shards folder, a foreign zarr group or a file: one error line, nothing
    touched."""
    import zarr

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"precious")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["mine"] = 1
    (tmp_path / "a-file").write_text("precious")
    for victim in (shards, tmp_path / "other.zarr", tmp_path / "a-file"):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        with pytest.raises(UserError, match="not a cappa feature store") as e:
            FeatureStore.create(victim, encoder=ENC, tokens=T, width=E, shard_capacity=C,
                                shards=["a"],
                                overwrite=True)
        assert "\n" not in str(e.value) and "nothing was deleted" in str(e.value)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (shards / "00000.tar").read_bytes() == b"precious"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder holds nothing to lose
    assert FeatureStore.create(empty, encoder=ENC, tokens=T, width=E, shard_capacity=C,
                               shards=["a"],
                               overwrite=True).shards == ["a"]


def _two_shards(tmp_path):
    rng = np.random.default_rng(2)
    st = FeatureStore.create(tmp_path / "f.zarr", encoder=ENC, tokens=T, width=E, shard_capacity=C,
                             shards=["a", "b"])
    a, b = _shard(rng, 4, "a"), _shard(rng, 6, "b")
    st.write_shard(0, *a)
    st.write_shard(1, *b)
    return st.path, a, b


def test_the_index_holds_keys_and_captions_as_arrays_and_reads_metadata_per_row(tmp_path):
    path, a, b = _two_shards(tmp_path)
    idx = FeatureStore.open(path).index()
    assert idx.keys.values.dtype == np.dtypes.StringDType()  # no Python object per row
    assert idx.keys == a[1] + b[1] and idx.captions == a[2] + b[2]
    assert idx.keys[5] == "b001" and type(idx.keys[5]) is str and idx.keys.index("b001") == 5
    assert idx.captions[np.array([5, 0])] == [b[2][1], a[2][0]] and list(idx.keys[:2]) == a[1][:2]
    assert "\n".join(idx.keys) == "\n".join(a[1] + b[1])  # data_digest's input
    assert idx.meta_of([5, 0, 9]) == [b[3][1], a[3][0], b[3][5]] and idx.meta_of([]) == []
    # only the chunks that hold the asked rows are read: shard a's rows, shard b's metadata gone
    (path / "meta/c/1").unlink()
    assert idx.meta_of([3, 0]) == [a[3][3], a[3][0]]
    (path / "meta/c/1").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError) as e:
        idx.meta_of([4])
    assert "\n" not in str(e.value) and str(path / "meta/c/1") in str(e.value)


def test_a_damaged_metadata_chunk_is_refused_when_the_index_is_opened(tmp_path):
    """Checked by its crc32c, not decoded: train never reads the metadata but must not train on a
    damaged store."""
    path, _, _ = _two_shards(tmp_path)
    f = path / "meta/c/0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        FeatureStore.open(path).index()
    assert "\n" not in str(e.value) and str(f) in str(e.value) and "shard a's meta" in str(e.value)
