"""The one reader of a run folder's JSON files: config.json, metrics.jsonl, best.json, summary.json, last.json.

Each is checked for the shape its readers rely on (an object, the keys they index, the types they format), so
malformed content is one line naming the file, never a traceback in whichever reader meets it first. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST_INFO = "best.json"
LAST = "last.json"

# What each file must hold, by key: the types its readers use (None allowed where the key may be null).
CONFIG_KEYS = {"train": dict, "decoder": dict, "tokenizer": dict, "store": dict}
CONFIG_OPTIONAL = {"split": dict, "data_order": dict, "encoder_random_init": bool}
NUMBER = (int, float)
SUMMARY_KEYS = {"steps": int, "total_steps": int, "complete": bool, "samples_per_s": NUMBER, "precision": str}
BEST_KEYS = {"step": int}
BEST_OPTIONAL = {"sha256": str, "epoch": int}
LAST_KEYS = {"step": int, "dir": str}
LAST_OPTIONAL = {"epoch": int, "batch": int, "sha256": dict}
METRIC_OPTIONAL = {"step": int, "kind": str, "loss_ar": NUMBER, "loss_par": NUMBER}


class BadRunFile(UserError):
    """A run file whose content a reader cannot trust; `file` and `why` let `verify` list it."""

    def __init__(self, file: Path, why: str):
        super().__init__(f"{file}: {why}")
        self.file, self.why = Path(file), why


def _kind(want) -> str:
    return "a number" if want is NUMBER else f"a {want.__name__}"


def _is(value, want) -> bool:
    if isinstance(value, bool) and want is not bool:  # JSON true is not a count
        return False
    return isinstance(value, want)


def check_keys(file: Path, obj, required: dict, optional: dict = {}) -> dict:
    """`obj` if it is a JSON object holding `required` keys of their types (and `optional` ones, if present,
    of theirs or null); else BadRunFile naming `file`."""
    if not isinstance(obj, dict):
        raise BadRunFile(file, f"holds a JSON {type(obj).__name__}, not an object")
    for k, want in required.items():
        if not _is(obj.get(k), want):
            raise BadRunFile(file, f"`{k}` is {str(obj.get(k))[:40]!r}, not {_kind(want)}")
    for k, want in optional.items():
        if obj.get(k) is not None and not _is(obj[k], want):
            raise BadRunFile(file, f"`{k}` is {str(obj[k])[:40]!r}, not {_kind(want)}")
    return obj


def read_json(file: Path, missing_ok: bool = False):
    """A whole JSON file (None when it is absent and `missing_ok`); unreadable or not JSON: BadRunFile."""
    try:
        text = Path(file).read_bytes().decode("utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise BadRunFile(file, "is missing") from None
    except OSError as e:
        raise BadRunFile(file, f"cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BadRunFile(file, "is not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadRunFile(file, f"is not JSON ({str(e)[:60]})") from None


def read_config(run: Path) -> dict:
    """config.json: what was trained on what (the recipe, decoder, tokenizer, store)."""
    file = Path(run) / CONFIG
    return check_keys(file, read_json(file), CONFIG_KEYS, CONFIG_OPTIONAL)


def read_summary(run: Path) -> Optional[dict]:
    """summary.json, or None when training has not finished once."""
    file = Path(run) / SUMMARY
    obj = read_json(file, missing_ok=True)
    return None if obj is None else check_keys(file, obj, {}, SUMMARY_KEYS)


def read_best(run: Path) -> Optional[dict]:
    """best.json (the best epoch's step and the sha256 of best.safetensors), or None when there is none."""
    file = Path(run) / BEST_INFO
    obj = read_json(file, missing_ok=True)
    return None if obj is None else check_keys(file, obj, BEST_KEYS, BEST_OPTIONAL)


def read_last(ckpt_dir: Path) -> Optional[dict]:
    """checkpoints/last.json (the newest checkpoint's step and folder), or None when there is none."""
    file = Path(ckpt_dir) / LAST
    obj = read_json(file, missing_ok=True)
    return None if obj is None else check_keys(file, obj, LAST_KEYS, LAST_OPTIONAL)


def read_metrics(file: Path) -> list[dict]:
    """metrics.jsonl's entries, one JSON object per line. A torn last line (a kill mid-append) is skipped;
    any other line that is not UTF-8, not JSON or not an entry is BadRunFile naming the line."""
    try:
        raw = Path(file).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise BadRunFile(file, f"cannot be read ({e.strerror or e})") from None
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError is a ValueError
            if i == len(lines) - 1:  # no newline after it: the append was cut short
                continue
            what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"
            raise BadRunFile(file, f"line {i + 1} is {what}") from None
        try:
            out.append(check_keys(file, entry, {}, METRIC_OPTIONAL))
        except BadRunFile as e:
            raise BadRunFile(file, f"line {i + 1} {e.why}") from None
    return out
