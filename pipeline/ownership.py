"""May this command write here: only into a folder that is new, empty, or carries our marker.

The one rule every stage applies before it writes into a folder a user named (`--shards`,
`--synthetic-dir`, `--run`, ...): a new folder is created and marked; an empty one is marked; a
folder whose marker says this tool made it for the same purpose is ours; anything else is refused
with one line naming the folder and its first foreign file, and nothing in it is touched. Files we
create in a folder we did not make (the marker itself, a lock beside the folder) are opened with
O_NOFOLLOW and O_EXCL, so a planted symlink is never followed and an existing file is never
truncated.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.osutil import printable

# No .json suffix: img2dataset reads every top-level *.json of a shards folder as a shard's stats.
MARKER = ".cappa-pipeline"
TOOL = "cappa-pipeline"
# Entries a folder may hold and still count as empty: a fresh filesystem's mount point has
# lost+found.
HARMLESS = frozenset({"lost+found"})
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_new(path: Path, flags: int = os.O_WRONLY, mode: int = 0o644) -> int:
    """A descriptor on a file that did not exist: never a symlink's target, never someone's file
    truncated."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)


def write_new(path: Path, data: bytes) -> None:
    """`data` into `path` via a temp file made by `open_new`, fsynced, then renamed over `path` (a
    rename replaces a planted symlink itself rather than writing through it)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = open_new(tmp)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_marker(folder: Path) -> dict | None:
    """The marker's content if `folder` carries a readable one (a regular file, not a link), else
    None.
    """
    try:
        fd = os.open(Path(folder) / MARKER, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        out = json.loads(data)
    except ValueError:
        return None
    return out if isinstance(out, dict) and out.get("tool") == TOOL else None


def _mark(folder: Path, kind: str, stage: str) -> None:
    body = {"tool": TOOL, "kind": kind, "made_by": stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_new(folder / MARKER, (json.dumps(body, sort_keys=True) + "\n").encode())


def _foreign(folder: Path) -> list[str]:
    """Entries of `folder` other than our marker and harmless ones, sorted (the first is named in
    refusals)."""
    return sorted(n for n in os.listdir(folder) if n not in HARMLESS and n != MARKER)


def check(folder: Path, kind: str, noun: str, legacy: Callable[[Path], bool] | None = None) -> str:
    """What `claim` would do, without doing it: "new" (create and mark), "ours", or "mark" (an empty
    folder, or one `legacy` recognises); anything else raises the one-line refusal. Lets a command
    check every folder it will write before it creates any of them."""
    folder = Path(folder)
    name = printable(str(folder))
    try:
        if not folder.exists() and not folder.is_symlink():
            return "new"
        if not folder.is_dir():
            raise UserError(f"cannot write {name}: it is not a folder; move it away or give another "
                            f"{noun}, then run the same command again")
        mark = read_marker(folder)
        if mark is not None:
            if mark.get("kind") != kind:
                raise UserError(f"{name} is a {mark.get('kind')} folder of this tool, not a "
                                f"{noun}: use another folder")
            return "ours"
        foreign = _foreign(folder)
        if foreign and not (legacy and legacy(folder)):
            raise UserError(f"{name} holds files this tool did not make (first: "
                            f"{printable(foreign[0])}); refusing to write there: give a new or "
                            f"empty folder as the {noun}")
        return "mark"
    except OSError as e:
        raise UserError(f"cannot read the {noun} {name}: {e.strerror or e}") from None


def claim(folder: Path, kind: str, stage: str, noun: str,
          legacy: Callable[[Path], bool] | None = None) -> Path:
    """Make `folder` ours for `kind` ("shards", "synthetic", "run", "store") or refuse with one
    line.

    `stage` names the writer in the marker ("pipeline fetch"); `noun` names the folder in messages
    ("shards folder"). `legacy(folder)` may recognise a folder this tool made before markers existed
    (it is then marked). Returns the folder.
    """
    folder = Path(folder)
    verdict = check(folder, kind, noun, legacy)
    try:
        if verdict == "new":
            folder.mkdir(parents=True)
        if verdict != "ours":
            _mark(folder, kind, stage)
        return folder
    except OSError as e:
        where = printable(str(e.filename or folder))
        raise UserError(f"cannot write to the {noun} {printable(str(folder))}: {where}: "
                        f"{e.strerror or e}") from None
