"""Early stopping on validation loss and the best epoch's weights (`best.safetensors`), kept for
eval.

The state is derived from the run's own records, never kept beside them: the best value and the
count of validations since it are recomputed from `metrics.jsonl`'s epoch-end val entries, which
`--resume` has already cut back to its checkpoint. So a resumed run makes the same decisions as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from pipeline.objective import expected_objective

BEST_WEIGHTS = "best.safetensors"
BEST_INFO = "best.json"


def val_objective(entry: dict, parallel_fraction: float) -> Optional[float]:
    """The validation estimate of the training objective (`objective.expected_objective`)."""
    return expected_objective(entry.get("loss_ar"), entry.get("loss_par"), parallel_fraction)


class EarlyStop:
    """Best validation objective so far and the epoch-end validations since it; `patience` 0 (or
    None) = never."""

    def __init__(self, patience: Optional[int], parallel_fraction: float, entries: list[dict] = ()):
        self.patience, self.pf = patience, parallel_fraction
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_entry: dict = {}
        self.since = 0
        # epoch-end validations only (an interrupted run's "stop" entries are not epochs)
        for e in entries:
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
        best = self.best_entry
        mix = f"{1 - self.pf:.2f} x autoregressive + {self.pf:.2f} x parallel"
        return {"criterion": f"val loss, {mix}", "best": self.best, "best_step": self.best_step,
                "validations_since_best": self.since,
                "best_loss_ar": best.get("loss_ar"), "best_loss_par": best.get("loss_par"),
                "patience": self.patience, "stopped_early": self.exhausted}


def save_best(run_dir: Path, model, info: dict) -> None:
    """best.safetensors (the decoder's weights) and best.json, each written to a temp file and
    renamed.

    Weights first: a crash between the two leaves best.json naming the previous best, whose step
    differs from the new weights' metadata, and `best_checkpoint` then refuses the pair instead of
    mixing them."""
    from pipeline.checkpoint import atomic_write_text, save_file

    tmp = run_dir / f".{BEST_WEIGHTS}.tmp"
    weights = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp, metadata={"step": str(info["step"])})
    os.replace(tmp, run_dir / BEST_WEIGHTS)
    atomic_write_text(run_dir / BEST_INFO, json.dumps(info, indent=2, sort_keys=True))


def best_checkpoint(run_dir: Path) -> Optional[tuple[Path, dict]]:
    """(weights path, info) of the run's best epoch, or None when there is none or it is not
    consistent."""
    from safetensors import safe_open

    path, info_path = Path(run_dir) / BEST_WEIGHTS, Path(run_dir) / BEST_INFO
    try:
        info = json.loads(info_path.read_text())
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step")
    except (OSError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - a torn safetensors header: no usable best
        return None
    if step != str(info.get("step")):
        return None
    return path, info
