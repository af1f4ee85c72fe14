"""A run's metrics.jsonl (read, append, cut back on resume) and its loss plot. No torch: status reads it too."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import UserError
from pipeline.osutil import atomic_write, atomic_write_text
from pipeline.records import read_metrics

# What a failed write in the run folder tells the user to do (the last checkpoint is intact either way).
WRITE_HINT = "make room (or make the folder writable), then rerun with --resume"


class MetricsLog:
    """metrics.jsonl: one JSON object per line (`kind` train | val, `step`, losses), appended by rank 0; a torn
    last line is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Every entry; a torn last line is skipped, any other malformed line is one line naming it."""
        return read_metrics(self.path)

    def last(self) -> tuple[dict, dict]:
        """The last train entry and the last validation entry ({} when there is none)."""
        last = {"train": {}, "val": {}}
        for e in self.read():
            if e.get("kind") in last:
                last[e["kind"]] = e
        return last["train"], last["val"]

    def reset(self, keep_through_step: int | None) -> None:
        """Keep only entries of steps <= the checkpoint's (and none written at an interrupting stop)."""
        keep = [] if keep_through_step is None else [
            e for e in self.read() if e.get("step", 0) <= keep_through_step and not e.get("stop")]
        try:
            atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in keep))
        except OSError as e:
            raise self._error(e) from None

    def append(self, entry: dict) -> None:
        safe = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(safe, allow_nan=False) + "\n")  # NaN is not JSON
        except OSError as e:  # a full disk or a read-only folder: one line, not a traceback
            raise self._error(e) from None

    def _error(self, e: OSError) -> UserError:
        return UserError(f"cannot write {self.path}: {e.strerror or e}; the last checkpoint is intact: {WRITE_HINT}")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """A figure as PNG, written atomically; the figure is closed either way."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)


def plot_loss(entries: list[dict], path: Path, *, title: str, final: dict | None = None) -> None:
    """Train and validation loss of both modes against step (metrics.jsonl entries); `final`: a validation
    loss ({loss_ar, loss_par}) drawn as stars at the last step (eval's own)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, style in (("train", "-"), ("val", "o--")):
        for mode, colour, name in (("ar", "tab:blue", "autoregressive"), ("par", "tab:orange", "parallel")):
            pts = [(e["step"], e[f"loss_{mode}"]) for e in entries
                   if e.get("kind") == kind and e.get(f"loss_{mode}") is not None]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, style, color=colour, label=f"{kind} {name}", markersize=4, alpha=0.85)
    if final and entries:
        step = max(e.get("step", 0) for e in entries)
        for mode, colour in (("ar", "tab:blue"), ("par", "tab:orange")):
            if final.get(f"loss_{mode}") is not None:
                ax.plot([step], [final[f"loss_{mode}"]], "*", color=colour, markersize=12)
    if not ax.lines:
        ax.text(0.5, 0.5, "metrics.jsonl holds no losses", ha="center", va="center", transform=ax.transAxes,
                parse_math=False)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, parse_math=False)  # a run folder's name may hold "$": plain text, never TeX
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
