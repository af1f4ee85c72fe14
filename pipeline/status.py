"""`pipeline status`: what each stage has on disk, read from the stages' own markers. Never imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.config import StatusConfig


# --- fetch: img2dataset's per-shard stats files ------------------------------------------------------------
def fetch_summary(shards: Path) -> dict:
    """Counts from img2dataset's `*_stats.json` files. (Filled in by the fetch stage's issue.)"""
    return {"path": str(shards), "exists": shards.is_dir()}


def render_fetch(console: Console, s: dict) -> None:
    console.print(f"fetch: {s['path']} {'present' if s['exists'] else 'missing'}")


# --- encode: the zarr feature store ------------------------------------------------------------------------
def store_summary(store: Path, shards: Path) -> dict:
    """Coverage and provenance of the feature store. (Filled in by the encode stage's issue.)"""
    return {"path": str(store), "exists": store.exists()}


def render_store(console: Console, s: dict) -> None:
    console.print(f"store: {s['path']} {'present' if s['exists'] else 'missing'}")


# --- train: run folders ------------------------------------------------------------------------------------
def runs_summary(runs: Path) -> dict:
    """Per-run progress and last losses. (Filled in by the train stage's issue.)"""
    return {"path": str(runs), "exists": runs.is_dir()}


def render_runs(console: Console, s: dict) -> None:
    console.print(f"runs: {s['path']} {'present' if s['exists'] else 'missing'}")


def collect(cfg: StatusConfig) -> dict:
    return {
        "fetch": fetch_summary(cfg.shards),
        "store": store_summary(cfg.store, cfg.shards),
        "runs": runs_summary(cfg.runs),
    }


def run(cfg: StatusConfig) -> dict:
    data = collect(cfg)
    if cfg.json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        console = Console()
        render_fetch(console, data["fetch"])
        render_store(console, data["store"])
        render_runs(console, data["runs"])
    return data
