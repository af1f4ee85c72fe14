"""May this command write here: planted lock links, other tools' folders, and what reaches the
terminal.

Every refusal is checked as a user meets it (the CLI in a subprocess): exit 2, one `error:` line
naming the folder or file, and every byte of what was there left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.lock import FolderLock
from pipeline.ownership import MARKER, claim

pytestmark = pytest.mark.faults

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: a file's bytes, a link's target (links are not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        else:
            out[rel] = p.read_bytes() if p.is_file() else "dir"
    return out


# --- locks ----------------------------------------------------------------------------------------
def test_a_planted_lock_link_is_refused_and_left_as_it_is(tiny_shards, tmp_path):
    """`<shards>.lock`, `<run>.lock` and `<store>.lock` planted as symlinks (to a file, to a path
    that does not exist yet) or as a hard link: refused with one line; the target keeps its bytes,
    no file appears at a dangling link's target, and the link itself is still there."""
    home = tmp_path / "home"
    home.mkdir()
    precious = home / "precious.txt"
    precious.write_text("my notes\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "shards.lock").symlink_to(precious)
    (work / "run.lock").symlink_to(home / "not-yet.txt")  # dangling: following it creates the file
    (work / "f.zarr.lock").symlink_to(precious)
    before = _snapshot(tmp_path)

    line = _one_error_line(_cli("fetch", "--shards", work / "shards", "--count", 4,
                                "--synthetic-dir", work / "syn"))
    assert "shards.lock" in line and "symbolic link" in line
    line = _one_error_line(_cli("train", "--store", work / "nothing.zarr", "--run", work / "run",
                                "--device", "cpu"))
    assert "run.lock" in line and "symbolic link" in line
    line = _one_error_line(_cli("encode", "--shards", tiny_shards, "--store", work / "f.zarr",
                                "--model", "vit_tiny_patch16_224", "--weights", "random",
                                "--device", "cpu"))
    assert "f.zarr.lock" in line and "symbolic link" in line
    assert _snapshot(tmp_path) == before  # nothing written, created or removed anywhere

    (work / "shards.lock").unlink()
    os.link(precious, work / "shards.lock")  # a hard link: our record would overwrite the notes
    with pytest.raises(UserError, match="other links"):
        FolderLock(work / "shards", who="fetch").acquire()
    (work / "shards.lock").unlink()
    (work / "shards.lock").write_text("a file of someone else's")
    with pytest.raises(UserError, match="holds something else"):
        FolderLock(work / "shards", who="fetch").acquire()
    assert precious.read_text() == "my notes\n"
    assert (work / "shards.lock").read_text() == "a file of someone else's"


# --- the folders fetch writes ---------------------------------------------------------------------
def _user_folder(root: Path, manifest: bytes) -> Path:
    """A folder of another tool's (or a person's) files, under the names fetch writes."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "00000001.jpg").write_bytes(b"\xff\xd8 a holiday photo")
    (root / "images" / "cat.jpg").write_bytes(b"\xff\xd8 the cat")
    (root / "urls.parquet").write_bytes(b"PAR1 their list")
    (root / "manifest.json").write_bytes(manifest)
    return root


@pytest.mark.parametrize("manifest", [b'{"seed": 5, "version": 1, "count": 2}',
                                      b"not json at all {"])
def test_a_user_folder_as_synthetic_dir_is_refused_untouched(tmp_path, manifest):
    """--synthetic-dir on a folder fetch did not make (a JSON manifest of another seed: the old code
    deleted images/*.jpg; a non-JSON one: a traceback): one line naming the folder and its first
    file."""
    user = _user_folder(tmp_path / "mine", manifest)
    before = _snapshot(user)
    line = _one_error_line(_cli("fetch", "--shards", tmp_path / "shards", "--count", 4,
                                "--synthetic-dir", user, "--processes", 1))
    assert str(user) in line and "first: images" in line
    assert _snapshot(user) == before and not (user / MARKER).exists()


def test_a_torn_manifest_in_our_own_synthetic_dir_is_one_line(tmp_path):
    syn = claim(tmp_path / "syn", "synthetic", "pipeline fetch --source synthetic",
                "--synthetic-dir folder")
    (syn / "manifest.json").write_text('{"version": 3, "se')  # what a full disk leaves
    line = _one_error_line(_cli("fetch", "--shards", tmp_path / "shards", "--count", 4,
                                "--synthetic-dir", syn))
    assert "manifest.json" in line and "not a JSON object" in line


def test_another_tools_shards_folder_is_refused_untouched(tmp_path):
    """--shards on a folder holding another tool's 00000.tar / 00000.parquet: one line, nothing
    overwritten, and nothing drawn or created for the synthetic source either."""
    shards = tmp_path / "theirs"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"their tar")
    (shards / "00000.parquet").write_bytes(b"PAR1 their table")
    before = _snapshot(shards)
    line = _one_error_line(_cli("fetch", "--shards", shards, "--count", 4,
                                "--synthetic-dir", tmp_path / "syn"))
    assert str(shards) in line and "first: 00000.parquet" in line
    assert _snapshot(shards) == before and not (tmp_path / "syn").exists()


def test_folders_fetch_made_before_markers_resume_and_get_one(tiny_shards, tmp_path):
    """A shards folder and synthetic folder made by this stage before folders were marked (our
    run.json, our manifest): accepted, marked, and a lost shard is fetched again from the same
    drawings."""
    root = tmp_path / "old"
    shutil.copytree(tiny_shards.parent, root)
    for d in (root / "shards", root / "synthetic"):
        (d / MARKER).unlink()
    (root / "shards" / "00002_stats.json").unlink()
    drawn = root / "synthetic" / "images"
    images = {p.name: p.stat().st_mtime_ns for p in drawn.iterdir()}
    p = _cli("fetch", "--shards", root / "shards", "--count", 96, "--samples-per-shard", 32,
             "--processes", 1, "--threads", 8, "--synthetic-dir", root / "synthetic", timeout=300)
    assert p.returncode == 0, p.stderr
    assert (root / "shards" / "00002_stats.json").exists()
    assert {p.name: p.stat().st_mtime_ns for p in drawn.iterdir()} == images  # not redrawn
    for d, kind in ((root / "shards", "shards"), (root / "synthetic", "synthetic")):
        assert json.loads((d / MARKER).read_text())["kind"] == kind


def test_claim_marks_new_and_empty_folders_and_keeps_kinds_apart(tmp_path):
    new = claim(tmp_path / "a" / "b", "shards", "pipeline fetch", "shards folder")
    assert json.loads((new / MARKER).read_text())["made_by"] == "pipeline fetch"
    claim(new, "shards", "pipeline fetch", "shards folder")  # ours: accepted again
    with pytest.raises(UserError, match="shards folder of this tool, not a run folder"):
        claim(new, "run", "pipeline train", "run folder")
    empty = tmp_path / "empty"
    (empty / "lost+found").mkdir(parents=True)  # a fresh filesystem's mount point is empty too
    claim(empty, "run", "pipeline train", "run folder")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / MARKER).symlink_to(tmp_path / "a" / "b" / MARKER)  # a planted link is not a marker
    (linked / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"first: config\.json"):
        claim(linked, "shards", "pipeline fetch", "shards folder")
    with pytest.raises(UserError, match="it is not a folder"):
        claim(new / MARKER, "run", "pipeline train", "run folder")


# --- what reaches the terminal and the figures ----------------------------------------------------
def test_caption_prints_file_names_escaped(tiny_run, tiny_shards, tmp_path):
    """A file name holding escape codes and a newline is printed escaped (as repr would), so it
    cannot clear or recolour the terminal or forge an output line."""
    src = next((tiny_shards.parent / "synthetic" / "images").glob("*.jpg"))
    hostile = tmp_path / "photo\x1b[2J\x1b[31m\nforged: line.jpg"
    shutil.copy(src, hostile)
    p = _cli("caption", hostile, "--run", tiny_run, "--device", "cpu", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout + p.stderr
    lines = p.stdout.splitlines()
    escaped = str(tmp_path) + "/photo\\x1b[2J\\x1b[31m\\nforged: line.jpg: "
    assert len(lines) == 1 and lines[0].startswith(escaped)
    line = _one_error_line(_cli("caption", tmp_path / "gone\x1b]0;title\x07.jpg", "--run",
                                tiny_run))
    assert "\x1b" not in line and "gone\\x1b]0;title\\x07.jpg" in line


def test_eval_figures_draw_tex_like_captions_as_text(tmp_path):
    """Captions holding `$...$` that is not valid TeX, or a generated `$$$`, are drawn as they are
    (matplotlib parsed them as maths and the figure, after all of eval's work, died with a
    ParseFatalException)."""
    from PIL import Image

    from pipeline import report

    samples = [{"key": "k$\\x$", "reference": "a $\\frac{ red$ square", "greedy": "$$$",
                "beam": "$\\nosuchmacro$", "parallel": "costs $5 and $^^$"},
               {"key": "0001", "reference": "$", "greedy": "$x$"}]
    report.plot_grid(samples, [Image.new("RGB", (32, 32)), None], tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 100


def test_loss_plot_of_a_run_named_like_tex_is_drawn(tmp_path):
    """A run folder named `r$\\x$` gave matplotlib's mathtext a ParseFatalException when loss.png was
    written after training; the title is plain text."""
    from pipeline.runlog import plot_loss

    entries = [{"kind": "train", "step": s, "loss_ar": 3.0 / s, "loss_par": 4.0 / s} for s in (1, 2, 3)]
    plot_loss(entries, tmp_path / "loss.png", title="run r$\\x$ and $$$")
    plot_loss([], tmp_path / "empty.png", title="$\\frac{$")
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "empty.png").stat().st_size > 0


def test_train_into_a_users_folder_is_refused_untouched(tiny_store, tmp_path):
    """`pipeline train --run DIR` on a folder of the user's files (no run of ours) overwrote
    config.json, metrics.jsonl, summary.json, loss.png and best.safetensors, exit 0."""
    from conftest import TINY_TRAIN, cli_options

    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png", "best.safetensors"):
        (user / name).write_bytes(f"the user's own {name}\n".encode())
    before = _snapshot(user)
    p = _cli("train", "--store", tiny_store, "--run", user, "--epochs", "1", "--max-steps", "1",
             *cli_options(TINY_TRAIN))
    line = _one_error_line(p)
    assert str(user) in line and "did not make" in line, line
    assert _snapshot(user) == before and not (user / MARKER).exists()


def test_runs_trained_before_markers_resume_and_get_one(tiny_run, tmp_path):
    """A run folder of ours without the marker (trained by an older version) is recognised by its
    config.json and checkpoints, resumes, and is marked."""
    from pipeline.run import check_run_folder, made_by_train

    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    (run / MARKER).unlink(missing_ok=True)
    assert made_by_train(run)
    check_run_folder(run)  # no refusal
    (run / "config.json").write_text("[1, 2]")  # no longer our record: refused
    with pytest.raises(UserError, match="did not make"):
        check_run_folder(run)
