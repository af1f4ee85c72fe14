"""The fetch stage end to end: real img2dataset, a loopback server, WebDataset shards read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from pipeline import captions, synthetic
from pipeline.config import FetchConfig
from pipeline.errors import UserError
from stages import fetch


def _read_shards(shards: Path) -> list[tuple]:
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    return list(ds)


def _stats(shards: Path) -> dict[str, dict]:
    return {p.name[:5]: json.loads(p.read_text()) for p in sorted(shards.glob("*_stats.json"))}


def test_synthetic_shards_read_back(tiny_shards):
    samples = _read_shards(tiny_shards)
    stats = _stats(tiny_shards)
    assert sorted(stats) == ["00000", "00001", "00002"]
    assert sum(s["count"] for s in stats.values()) == 96
    assert len(samples) == sum(s["successes"] for s in stats.values())
    # exactly round(96 * 3%) = 3 rows are broken on purpose, one of each kind
    assert len(samples) == 93
    reasons = [m for s in stats.values() for m in s["status_dict"] if m != "success"]
    assert any("404" in m for m in reasons) and any("IncompleteRead" in m for m in reasons)
    assert any("decod" in m for m in reasons)
    for key, img, caption, meta in samples:
        assert min(img.size) == 256  # shortest side resized to 256: a 224 centre crop fits
        assert meta["caption"] == caption and meta["key"] == key
        attrs = json.loads(meta["attributes"])
        assert captions.parse_caption(caption) == captions.primary_attributes(attrs)
    # per shard: the tar holds exactly that shard's successes
    for name, s in stats.items():
        assert len(_read_shards_one(tiny_shards / f"{name}.tar")) == s["successes"]


def _read_shards_one(tar: Path) -> list:
    return list(wds.WebDataset(str(tar), shardshuffle=False))


def test_synthetic_colours_survive_the_fetch(tiny_shards):
    """The primary group's colour is really drawn: the image holds pixels close to it."""
    import numpy as np

    for _, img, _, meta in _read_shards(tiny_shards)[:12]:
        attrs = json.loads(meta["attributes"])
        want = np.array(synthetic.RGB[attrs["groups"][0]["colour"]], np.float32)
        dist = np.linalg.norm(np.asarray(img, np.float32) - want, axis=-1)
        assert (dist < 40).mean() > 0.002


def test_cc_format_tsv_with_dead_links(tmp_path):
    """A headerless CC3M-style TSV served from our own loopback server, with a few dead links."""
    import socket

    from pipeline.loopback import serve

    from pipeline import status

    rows = synthetic.make_rows(seed=5, count=9, broken_fraction=0.0)
    img_dir = tmp_path / "www"
    img_dir.mkdir()
    for r in rows:
        (img_dir / r.file).write_bytes(synthetic.render(r.attributes))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with serve(img_dir) as base:
        lines = [(f'{r.caption} "quoted" it\'s', f"{base}/img/{r.file}") for r in rows]
        lines[2] = ("a dead link", f"{base}/img/does-not-exist.jpg")
        lines[5] = ("an html page", f"{base}/html/{rows[5].file}")
        lines[7] = ("nobody home", f"http://127.0.0.1:{closed_port}/x.jpg")
        lines.append(("beyond --count", f"{base}/img/{rows[0].file}"))
        tsv = tmp_path / "Train_GCC-training.tsv"
        tsv.write_text("".join(f"{c}\t{u}\n" for c, u in lines))
        cfg = FetchConfig(source=str(tsv), count=9, shards=tmp_path / "shards", samples_per_shard=4,
                          processes=1, threads=4, timeout=5)
        summary = fetch.run(cfg)
    stats = _stats(cfg.shards)
    assert len(stats) == 3 and sum(s["count"] for s in stats.values()) == 9  # 4 + 4 + 1: count is honoured
    samples = _read_shards(cfg.shards)
    assert len(samples) == 6 == summary["fetched"]
    assert summary["failures"] == {"http 404": 1, "not an image / decode error": 1, "connection refused": 1}
    want = {c for i, (c, _) in enumerate(lines[:9]) if i not in (2, 5, 7)}
    assert {caption for _, _, caption, _ in samples} == want  # captions verbatim, quotes and all
    assert all("attributes" not in meta for *_, meta in samples)
    assert status.fetch_summary(cfg.shards) == summary
    assert not (tmp_path / "synthetic").exists() and not Path("_tmp").exists()


def test_rerun_redoes_only_unfinished_shards(tiny_shards, tmp_path):
    from pipeline import status

    root = tmp_path / "copy"
    shutil.copytree(tiny_shards.parent, root)
    shards = root / "shards"
    cfg = FetchConfig(count=96, samples_per_shard=32, shards=shards, synthetic_dir=root / "synthetic",
                      processes=1, threads=8, seed=0)
    before = _stats(shards)
    # an interrupted shard: a torn tar and no stats file
    (shards / "00001_stats.json").unlink()
    tar = shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    s = status.fetch_summary(shards)
    assert (s["shards_complete"], s["shards_unfinished"], s["unfinished"]) == (2, 1, ["00001"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[02]*")}
    images = {p.name: p.stat().st_mtime_ns for p in (root / "synthetic" / "images").iterdir()}

    fetch.run(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[02]*")} == mtimes  # finished shards untouched
    assert {p.name: p.stat().st_mtime_ns for p in (root / "synthetic" / "images").iterdir()} == images  # no redraw
    after = _stats(shards)
    assert after["00001"]["successes"] == before["00001"]["successes"]
    assert len(_read_shards_one(shards / "00001.tar")) == after["00001"]["successes"]
    assert status.fetch_summary(shards)["state"] == "complete"
    record = json.loads(fetch.record_path(shards).read_text())
    assert record["state"] == "done" and record["shards_todo"] == 1 and record["timings"]["total_s"] > 0

    # every shard complete: nothing is fetched again; another list into the same folder is refused
    fetch.run(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[02]*")} == mtimes
    with pytest.raises(UserError, match="another list"):
        fetch.run(FetchConfig(count=64, samples_per_shard=32, shards=shards, synthetic_dir=root / "synthetic"))


def test_status_json_matches_disk(tiny_shards):
    """`pipeline status --json` in a fresh interpreter: numbers equal the shards on disk; torch never imported."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.cli import main; sys.argv = ['pipeline', 'status', '--json', '--shards', "
            f"{str(tiny_shards)!r}, '--store', {str(tiny_shards / 'none.zarr')!r}, '--runs', "
            f"{str(tiny_shards / 'none')!r}]\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().endswith("no torch")
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    f = json.loads(lines[0])["fetch"]
    stats = _stats(tiny_shards)
    samples = _read_shards(tiny_shards)
    assert f["fetched"] == len(samples) == sum(s["successes"] for s in stats.values())
    assert f["rows_done"] == f["rows_requested"] == 96
    assert f["failed"] == sum(f["failures"].values()) == 96 - len(samples)
    assert (f["shards_complete"], f["shards_unfinished"], f["state"]) == (3, 0, "complete")
    assert f["success_rate"] == round(len(samples) / 96, 4)


def test_status_on_missing_and_empty_folders(tmp_path):
    from rich.console import Console

    from pipeline import status

    for path, state, words in ((tmp_path / "nope", "missing", "does not exist"), (tmp_path, "empty", "no shards")):
        s = status.fetch_summary(path)
        assert s["state"] == state and s["fetched"] == 0 and s["success_rate"] is None
        console = Console(record=True, width=120)
        status.render_fetch(console, s)
        assert words in console.export_text()


@pytest.mark.parametrize("args,message", [
    (["--source", "no/such/list.tsv"], "does not exist"),
    (["--source", "{bad}"], "cannot read url list"),
    (["--source", "{cols}"], "no url column"),
    (["--distributor", "ray"], "needs ray"),
    (["--distributor", "dask"], "must be one of"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    import subprocess
    import sys

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp_path / "cols.csv").write_text("caption,link2\na,b\n")
    args = [a.format(bad=tmp_path / "bad.parquet", cols=tmp_path / "cols.csv") for a in args]
    out = subprocess.run([sys.executable, "-m", "pipeline", "fetch", "--shards", str(tmp_path / "s"), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "s").exists()
