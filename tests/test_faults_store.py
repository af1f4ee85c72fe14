"""A damaged feature store is refused with one line naming the file, never read as empty rows or a traceback.

Each case damages a copy of the shared tiny store the way a disk, a sync tool or a hand edit would, then runs
what a user runs: `pipeline verify --store` (in-process, as `pipeline.cli.main` runs it) and the store open +
index that train, eval and bench start with; a few go through `train.run` and `encode.run` themselves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import cli
from pipeline.errors import UserError
from conftest import store_rows
from pipeline.store import FeatureStore

pytestmark = pytest.mark.faults


def pipeline_cli(*argv) -> tuple[int, str]:
    """`pipeline ARGV` in-process as `pipeline.cli.main` runs it: (exit code, the error line or the output)."""
    r = CliRunner().invoke(cli.app, [str(a) for a in argv])
    if isinstance(r.exception, UserError):
        return r.exception.exit_code, str(r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # a traceback
    return r.exit_code, r.output


def one_line(msg: str, file: str) -> None:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert file in msg, (file, msg)


def _attrs(store: Path, **kv) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(kv)
    (store / "zarr.json").write_text(json.dumps(meta))


def _array_meta(store: Path, name: str, **kv) -> None:
    meta = json.loads((store / name / "zarr.json").read_text())
    meta.update(kv)
    (store / name / "zarr.json").write_text(json.dumps(meta))


# (how the store is damaged, the file the one line must name)
DAMAGE = {
    "keys chunk emptied": (lambda p: (p / "keys/c/1").write_bytes(b""), "keys/c/1"),
    "captions chunk garbage": (lambda p: (p / "captions/c/1").write_bytes(b"\x28\xb5\x2f\xfd" + b"junk" * 40),
                               "captions/c/1"),
    "meta chunk garbage": (lambda p: (p / "meta/c/0").write_bytes(b"\x00" * 64), "meta/c/0"),
    "valid chunk garbage": (lambda p: (p / "valid/c/2").write_bytes(b"\xff" * 16), "valid/c/2"),
    "done marker garbage": (lambda p: (p / "shard_done/c/0").write_bytes(b"\x01"), "shard_done/c/0"),
    "keys chunk deleted": (lambda p: (p / "keys/c/1").unlink(), "keys/c/1"),
    "captions chunk deleted": (lambda p: (p / "captions/c/0").unlink(), "captions/c/0"),
    "meta chunk deleted": (lambda p: (p / "meta/c/2").unlink(), "meta/c/2"),
    "valid chunk deleted": (lambda p: (p / "valid/c/1").unlink(), "valid/c/1"),
    "tokens edited": (lambda p: _attrs(p, tokens=196), "zarr.json"),
    "width edited": (lambda p: _attrs(p, width=384), "zarr.json"),
    "tokens many": (lambda p: _attrs(p, tokens="many"), "zarr.json"),
    "shard_capacity 1e12": (lambda p: _attrs(p, shard_capacity=1e12), "zarr.json"),
    "shard_capacity 10**12": (lambda p: _attrs(p, shard_capacity=10 ** 12), "zarr.json"),
    "shard_capacity halved": (lambda p: _attrs(p, shard_capacity=16, chunk_rows=16), "zarr.json"),
    "chunk_rows edited": (lambda p: _attrs(p, chunk_rows=7), "zarr.json"),
    "shards not a list": (lambda p: _attrs(p, shards="00000.tar"), "zarr.json"),
    "encoder not a record": (lambda p: _attrs(p, encoder=[1]), "zarr.json"),
    "features resized": (lambda p: _array_meta(p, "features", shape=[40, 197, 192]), "zarr.json"),
    "keys array deleted": (lambda p: shutil.rmtree(p / "keys"), "keys/zarr.json"),
    "store zarr.json garbage": (lambda p: (p / "zarr.json").write_bytes(b"{\xff"), "zarr.json"),
}


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "features.zarr"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_store_is_one_line_naming_the_file(store_copy, case):
    damage, file = DAMAGE[case]
    damage(store_copy)
    code, msg = pipeline_cli("verify", "--store", store_copy)
    assert code == 2 and "\n" not in msg, msg  # the file named, or "verify found N problem(s)" after the list
    with pytest.raises(UserError) as e:  # what train, eval and bench start with
        FeatureStore.open(store_copy).index()
    one_line(str(e.value), str(store_copy / file) if file != "zarr.json" else str(store_copy))


def test_verify_lists_every_damaged_column(store_copy):
    (store_copy / "keys/c/1").write_bytes(b"")
    (store_copy / "captions/c/2").unlink()
    r = CliRunner().invoke(cli.app, ["verify", "--store", str(store_copy)])
    assert isinstance(r.exception, UserError) and "2 problem(s)" in str(r.exception)
    assert "shard 00001.tar: keys chunk cannot be read" in r.output, r.output
    assert "shard 00002.tar: the captions chunk missing on disk" in r.output, r.output


def test_training_refuses_a_store_with_a_deleted_captions_chunk(store_copy, tmp_path):
    """Before, the shard's captions read as "" and the decoder trained on empty captions, exit 0."""
    from conftest import TINY_TRAIN

    from pipeline.config import TrainConfig
    from stages import train

    (store_copy / "captions/c/1").unlink()
    with pytest.raises(UserError) as e:
        train.run(TrainConfig(store=store_copy, run=tmp_path / "run", epochs=1, **TINY_TRAIN))
    one_line(str(e.value), str(store_copy / "captions/c/1"))
    assert not (tmp_path / "run").exists()


def test_a_real_cli_run_on_an_oversized_capacity_is_one_line(store_copy):
    """The user's path end to end: `python -m pipeline`, exit 2, one `error:` line (before: MemoryError)."""
    _attrs(store_copy, shard_capacity=10 ** 12)
    p = subprocess.run([sys.executable, "-m", "pipeline", "verify", "--store", str(store_copy)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "shard_capacity" in lines[0], p.stderr


def _one_shard(tiny_shards: Path, dst: Path, names=("00000", "00001")) -> Path:
    dst.mkdir()
    for name in names:
        for ext in (".tar", "_stats.json", ".parquet"):
            shutil.copy(tiny_shards / f"{name}{ext}", dst / f"{name}{ext}")
    return dst


def test_a_forged_stats_count_is_not_trusted(tiny_shards, tmp_path):
    """A `_stats.json` count of 1e9: its shard counts as unfinished where the shard's parquet disagrees, and
    without a parquet encode refuses with one line (before: MemoryError sizing the store)."""
    from conftest import TINY_ENCODE

    from pipeline.config import EncodeConfig
    from pipeline.status import fetch_summary
    from stages import encode

    shards = _one_shard(tiny_shards, tmp_path / "shards")
    stats = shards / "00001_stats.json"
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "count": 10 ** 9}))
    assert fetch_summary(shards)["unfinished"] == ["00001"]
    assert [n for n, _, _ in encode.complete_shards(shards)] == ["00000.tar"]
    (shards / "00001.parquet").unlink()  # another tool's shards: no parquet to check the count against
    with pytest.raises(UserError) as e:
        encode.run(EncodeConfig(shards=shards, store=tmp_path / "s.zarr", **TINY_ENCODE))
    one_line(str(e.value), "00001.tar's _stats.json")
    assert "would not fit in memory" in str(e.value)


# --- the sweep: every file of the store, deleted, cut in half, or a few bytes overwritten ------------------------
MODES = ("deleted", "truncated", "overwritten")


def damage_file(f: Path, mode: str) -> None:
    if mode == "deleted":
        f.unlink()
    elif mode == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:  # 8 bytes in the middle flipped (a JSON file becomes invalid UTF-8, a chunk fails its checksum)
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
        f.write_bytes(bytes(data))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _read_all(path: Path):
    """What train and eval read: the index and every valid row's features."""
    st = FeatureStore.open(path)
    index = st.index()
    return st.shard_done(), index, store_rows(st, index.rows)


@pytest.mark.slow
def test_sweep_every_store_file_damaged_reads_right_or_is_one_line(tiny_store, tmp_path):
    """For each file x {deleted, truncated, overwritten}: the readers (verify, open + index + features, status)
    read exactly the undamaged store's done shards, or refuse with one line naming a file of the store.
    A deleted done marker is the state a kill leaves mid-write: the shard reads as not done (encode redoes it)."""
    import numpy as np

    from pipeline.status import store_summary

    done0, index0, feats0 = _read_all(tiny_store)
    outcomes = {}
    for rel in files_under(tiny_store):
        for mode in MODES:
            path = tmp_path / f"{mode}-{rel.replace('/', '_')}" / "features.zarr"
            shutil.copytree(tiny_store, path)
            damage_file(path / rel, mode)
            code, msg = pipeline_cli("verify", "--store", path)
            assert code in (0, 2) and "\n" not in msg.strip() if code else True, (rel, mode, msg)
            store_summary(path, tmp_path / "no-shards")  # status never raises
            try:
                done, index, feats = _read_all(path)
            except UserError as e:
                one_line(str(e), str(path))
                outcomes[(rel, mode)] = "refused"
                continue
            keep = np.isin(index0.rows, index.rows)  # rows of shards still done
            assert (done <= done0).all() and np.array_equal(index.rows, index0.rows[keep]), (rel, mode)
            assert index.keys == [k for k, m in zip(index0.keys, keep) if m], (rel, mode)
            assert index.captions == [c for c, m in zip(index0.captions, keep) if m], (rel, mode)
            assert index.meta == [c for c, m in zip(index0.meta, keep) if m], (rel, mode)
            assert np.array_equal(feats, feats0[keep]), (rel, mode)
            outcomes[(rel, mode)] = "read" if done.all() else "shard not done"
            assert done.all() or rel.startswith("shard_done/c/"), (rel, mode)
    assert "refused" in outcomes.values() and len(outcomes) == 3 * len(files_under(tiny_store))


def test_a_deleted_done_marker_is_repaired_by_rerunning_encode(tiny_shards, tiny_store, tmp_path):
    from conftest import TINY_ENCODE

    from pipeline.config import EncodeConfig
    from stages import encode

    path = tmp_path / "features.zarr"
    shutil.copytree(tiny_store, path)
    (path / "shard_done/c/1").unlink()
    assert FeatureStore.open(path).shard_done().tolist() == [True, False, True]
    encode.run(EncodeConfig(shards=tiny_shards, store=path, **TINY_ENCODE))
    for rel in files_under(tiny_store):
        if rel != "zarr.json":  # its last_run record differs
            assert (path / rel).read_bytes() == (tiny_store / rel).read_bytes(), rel
