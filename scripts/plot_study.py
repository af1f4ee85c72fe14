"""Draw docs/training_study.png from run folders: validation and training AR loss against samples seen.

usage: python scripts/plot_study.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--ngram LOSS]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    ngram = None
    if "--ngram" in rest:
        i = rest.index("--ngram")
        ngram = float(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for spec in rest:
        label, run = spec.split("=", 1)
        cfg = json.loads((Path(run) / "config.json").read_text())["train"]
        entries = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        bs = cfg["batch_size"]
        tr = [(e["step"] * bs, e["loss_ar"]) for e in entries if e["kind"] == "train" and e.get("loss_ar")]
        va = [(e["step"] * bs, e["loss_ar"], e["loss_par"]) for e in entries if e["kind"] == "val"]
        line, = axes[0].plot(*zip(*tr), alpha=0.35, lw=1)
        if va:
            axes[0].plot([v[0] for v in va], [v[1] for v in va], "o-", color=line.get_color(), label=label)
            axes[1].plot([v[0] for v in va], [v[2] for v in va], "o-", color=line.get_color(), label=label)
    if ngram is not None:
        axes[0].axhline(ngram, ls="--", color="k", lw=1, label=f"text-only trigram ({ngram:.2f})")
    axes[0].set_title("autoregressive loss (line: train, dots: validation)")
    axes[1].set_title("parallel loss (validation)")
    for ax in axes:
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0.5, 6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1:])
