"""Fault injection: a full or read-only disk is one `error:` line (exit 2) in fetch and encode, never a traceback.

Tests run as root, so a chmod'ed folder would not stop them: the faults are injected at the OS boundary instead
(zarr's one file-writing function, `Path.write_text`), or are real (a path that is a file). After each, the
on-disk state is consistent and a rerun gives the uninterrupted result.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ENCODE

from pipeline.config import EncodeConfig, FetchConfig
from pipeline.errors import UserError
from pipeline.lock import FolderLock
from pipeline.store import FeatureStore
from stages import encode, fetch

pytestmark = pytest.mark.faults

ENOSPC = "No space left on device"
ARRAYS = ("features", "valid", "keys", "captions", "meta", "shard_done")


def same_store(a: Path, b: Path) -> None:
    """Bitwise equal arrays and shard list."""
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ga.attrs["shards"] == gb.attrs["shards"]
    for name in ARRAYS:
        x, y = np.asarray(ga[name][:]), np.asarray(gb[name][:])
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{name} differs"


def _one_error_line(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# the fault, in a fresh interpreter: zarr writes every chunk and metadata file through zarr.storage._local._put
_ENOSPC_ON = """
import errno, sys, threading, zarr.storage._local as L
real = L._put
def put(path, value, exclusive=False):
    if {match!r} in str(path):
        assert threading.current_thread() is not threading.main_thread()
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path, value, exclusive=exclusive)
L._put = put
from pipeline.cli import main
sys.argv = ["pipeline", *{args!r}]
main()
"""


def test_a_full_disk_in_the_store_writer_thread_is_one_line_and_resumes_bitwise(tiny_shards, tiny_store, tmp_path):
    """ENOSPC while the writer thread writes shard 1's features: exit 2, one line; shard 0 stays done, shard 1 is
    not marked done, the lock is free, and the rerun equals the uninterrupted store bitwise (before: a traceback
    from the writer's future, exit 1)."""
    store = tmp_path / "s.zarr"
    args = ["encode", "--shards", str(tiny_shards), "--store", str(store)]
    for k, v in TINY_ENCODE.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    code = _ENOSPC_ON.format(match=f"{os.sep}features{os.sep}c{os.sep}1{os.sep}", args=args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    _one_error_line(p, ENOSPC, str(store), "rerun the same command")
    st = FeatureStore.open(store)  # a reader sees a consistent store: the done shards only
    assert st.shard_done().tolist() == [True, False, False]
    assert len(st.index()) == sum(FeatureStore.open(tiny_store).shard_counts()[n] for n in st.shards[:1])
    FolderLock(store, who="encode").acquire().release()  # nobody holds the lock any more
    encode.run(EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE))
    same_store(store, tiny_store)


def test_a_full_disk_while_creating_or_finishing_the_store_is_one_line(tiny_shards, tiny_store, tmp_path,
                                                                        monkeypatch):
    """ENOSPC at the very first store write (create: nothing is left behind) and at the last (the `last_run`
    attribute, after every shard is done: the features are kept, the rerun has nothing to encode)."""
    import zarr.storage._local as local

    real = local._put
    calls = {"n": 0}

    def failing(match: str):
        def put(path, value, exclusive=False):
            calls["n"] += 1
            if match in str(path):
                raise OSError(errno.ENOSPC, ENOSPC, str(path))
            return real(path, value, exclusive=exclusive)
        return put

    store = tmp_path / "s.zarr"
    cfg = EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE)
    monkeypatch.setattr(local, "_put", failing(".tmp"))  # the store is built under .s.zarr.<id>.tmp
    with pytest.raises(UserError, match=ENOSPC):
        encode.run(cfg)
    assert not store.exists() and not list(tmp_path.glob(".s.zarr.*"))

    def last_run_fails(path, value, exclusive=False):
        if str(path).endswith(f"s.zarr{os.sep}zarr.json") and b"last_run" in bytes(value.as_buffer_like()):
            raise OSError(errno.ENOSPC, ENOSPC, str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", last_run_fails)
    with pytest.raises(UserError, match="cannot write the feature store"):
        encode.run(cfg)
    monkeypatch.setattr(local, "_put", real)
    assert FeatureStore.open(store).shard_done().all()
    assert encode.run(cfg)["images"] == 0  # nothing lost: every shard is done
    same_store(store, tiny_store)


def test_fetch_write_errors_are_one_line(tmp_path, monkeypatch):
    """fetch: the shards path is a file (a real mkdir failure, through the CLI), then ENOSPC writing run.json
    and the img2dataset log (injected): one `error:` line each, the lock is free afterwards, no thread or
    process left behind (all fail before img2dataset starts)."""
    as_file = tmp_path / "shards"
    as_file.write_text("not a folder")
    p = subprocess.run([sys.executable, "-m", "pipeline", "fetch", "--shards", str(as_file), "--count", "4"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _one_error_line(p, "cannot write", str(as_file), "run the same command again")
    assert as_file.read_text() == "not a folder" and not (tmp_path / "data").exists()

    real = Path.write_text
    for name in ("run.json.tmp", "img2dataset.log"):
        def write_text(self, data, *a, _name=name, **k):
            if self.name == _name:
                raise OSError(errno.ENOSPC, ENOSPC, str(self))
            return real(self, data, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
        cfg = FetchConfig(count=8, samples_per_shard=4, shards=tmp_path / f"s-{name}",
                          synthetic_dir=tmp_path / "synthetic", processes=1, threads=2)
        threads = set(threading.enumerate())
        with pytest.raises(UserError, match=f"cannot write .*{name}: {ENOSPC}"):
            fetch.run(cfg)
        monkeypatch.setattr(Path, "write_text", real)
        FolderLock(cfg.shards, who="fetch").acquire().release()
        assert set(threading.enumerate()) <= threads  # the loopback server stopped
