"""Early stopping on validation loss and the best epoch's weights (`best.safetensors`), kept for eval.

The state is derived from the run's own records, never kept beside them: the best value and the count of
validations since it are recomputed from `metrics.jsonl`'s epoch-end val entries, which `--resume` has
already cut back to its checkpoint. So a resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

BEST_WEIGHTS = "best.safetensors"
BEST_INFO = "best.json"


def val_objective(entry: dict, parallel_fraction: float) -> Optional[float]:
    """The validation estimate of the training objective: both modes' losses mixed as training mixes them."""
    ar, par = entry.get("loss_ar"), entry.get("loss_par")
    if parallel_fraction <= 0.0 or par is None:
        return ar
    if parallel_fraction >= 1.0 or ar is None:
        return par
    return (1.0 - parallel_fraction) * ar + parallel_fraction * par


class EarlyStop:
    """Best validation objective so far and the epoch-end validations since it; `patience` 0 (or None) = never."""

    def __init__(self, patience: Optional[int], parallel_fraction: float, entries: list[dict] = ()):
        self.patience, self.pf = patience, parallel_fraction
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_entry: dict = {}
        self.since = 0
        for e in entries:  # epoch-end validations only (an interrupted run's "stop" entries are not epochs)
            if e.get("kind") == "val" and not e.get("stop"):
                self.update(e)

    def update(self, entry: dict) -> bool:
        """Take one epoch-end validation entry; True when it is the best so far."""
        v = val_objective(entry, self.pf)
        if v is None:
            return False
        if self.best is None or v < self.best:
            self.best, self.best_step, self.best_entry, self.since = v, entry.get("step"), entry, 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.since >= self.patience

    def record(self) -> dict:
        return {"criterion": f"val loss, {1 - self.pf:.2f} x autoregressive + {self.pf:.2f} x parallel",
                "best": self.best, "best_step": self.best_step, "validations_since_best": self.since,
                "best_loss_ar": self.best_entry.get("loss_ar"), "best_loss_par": self.best_entry.get("loss_par"),
                "patience": self.patience, "stopped_early": self.exhausted}


def save_best(run_dir: Path, model, info: dict) -> None:
    """best.safetensors (the decoder's weights) and best.json (with their sha256), each written to a temp file
    and renamed.

    Weights first: a crash between the two leaves best.json naming the previous best, whose step differs from
    the new weights' metadata, and `best_checkpoint` then refuses the pair instead of mixing them."""
    from pipeline.checkpoint import atomic_write_text, save_weights

    tmp = run_dir / f".{BEST_WEIGHTS}.tmp"
    digest = save_weights(model, tmp, info["step"])  # a tied matrix once, as in checkpoints
    os.replace(tmp, run_dir / BEST_WEIGHTS)
    atomic_write_text(run_dir / BEST_INFO, json.dumps({**info, "sha256": digest}, indent=2, sort_keys=True))


def _weights_step(path: Path) -> Optional[str]:
    """The step recorded in a safetensors header, or None when the header does not read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("step")
    except Exception:  # noqa: BLE001 - safetensors raises its own types for a torn header
        return None


def best_checkpoint(run_dir: Path) -> Optional[tuple[Path, dict]]:
    """(weights path, info) of the run's best epoch, or None when there is none or the pair is from two saves
    (a crash between the two renames). Weights whose bytes differ from the sha256 in best.json, or a malformed
    best.json, are one line naming the file (`records.BadRunFile`), never loaded."""
    from pipeline.checkpoint import sha256_file
    from pipeline.records import BadRunFile, read_best

    path = Path(run_dir) / BEST_WEIGHTS
    info = read_best(run_dir)
    if info is None or not path.is_file():
        return None
    step = _weights_step(path)
    if step is not None and step != str(info["step"]):
        return None
    want = info.get("sha256")
    try:
        got = sha256_file(path) if want is not None else None
    except OSError as e:
        raise BadRunFile(path, f"cannot be read ({e.strerror or e})") from None
    if got != want:
        raise BadRunFile(path, f"does not match the sha256 in {BEST_INFO}: the file is damaged; delete "
                         f"{BEST_WEIGHTS} and {BEST_INFO} to use the newest checkpoint instead")
    if step is None:  # an old run (no digest) whose header does not read: no usable best
        return None
    return path, info
