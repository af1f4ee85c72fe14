"""The measuring kit of `pipeline bench`: interleaved timing rounds, their spreads, and the results file.

A ratio's two sides run interleaved (A B A B ...), so a slow phase of a noisy machine hits both; a figure is the
median over the rounds with its spread (min-max), and a target counts as met only when its lowest round meets
it. Results are kept per machine kind in one JSON file; a full run regenerates the table between the markers
of docs/BENCHMARKS.md and keeps the hand-written text around it.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from pipeline.config import BenchConfig
from pipeline.osutil import atomic_write_text

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    return statistics.median(interleaved({"fn": fn}, repeats=repeats, warmup=warmup, sync=sync)["fn"])


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Wall seconds of each fn per round, the fns run in turn (A B A B ...) for `warmup` + `repeats` rounds.

    Round i's A and B ran a few seconds apart, so a ratio taken round by round cancels most of a noisy
    machine's slow phases instead of comparing A's quiet minute with B's busy one.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def spread(xs: list[float]) -> dict:
    """{median, min, max, n} of per-round values."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratios(num: list[float], den: list[float]) -> dict:
    """Spread of num[i] / den[i] round by round (rates, not times: the larger, the faster)."""
    return spread([a / b for a, b in zip(num, den)])


def fmt(s: dict, digits: int = 2, pct: bool = False) -> str:
    """"median (min-max)" of a spread, as a percentage with pct."""
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})" if s["n"] > 1 else f(s["median"])


def met_at_least(s: dict, target: float) -> bool:
    """A `>= target` holds across the whole spread: its lowest round meets it."""
    return s["min"] >= target


def machine_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_outputs(cfg: BenchConfig, result: dict, *, markdown: bool = True) -> None:
    """Merge this machine kind's rows into the JSON (other kinds' rows untouched); regenerate the markdown
    table from all of them when `markdown`."""
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    all_results = json.loads(cfg.json.read_text()) if cfg.json.exists() else {}
    all_results[result["kind"]] = result
    atomic_write_text(cfg.json, json.dumps(all_results, indent=2, sort_keys=True) + "\n")
    if not markdown:
        return
    rows = ["| figure | value | target | met | kind | machine | date | commit |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, res in sorted(all_results.items()):
        for f in res["figures"]:
            met = "" if f.get("met") is None else ("yes" if f["met"] else "**no**")
            rows.append(f"| {f['figure']} | {f['value']} | {f.get('target', '')} | {met} | {res.get('kind', kind)} | "
                        f"{res['machine']} | {res['date']} | {res['commit']} |")
    table = "\n".join(rows)
    md = cfg.markdown.read_text() if cfg.markdown.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in md:
        md += f"\n{BEGIN}\n{END}\n"
    head, rest = md.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    atomic_write_text(cfg.markdown, f"{head}{BEGIN}\n{table}\n{END}{tail}")


def outputs_plan(cfg: BenchConfig) -> tuple[bool, bool]:
    """(write the JSON, regenerate the markdown). A quick run writes only a --json pointed away from the
    default; the markdown is regenerated only by a full run whose JSON sits beside it (the committed pair)."""
    default_json = Path(cfg.json).resolve() == Path(BenchConfig.json).resolve()
    write_json = not (cfg.quick and default_json)
    write_md = not cfg.quick and Path(cfg.json).resolve().parent == Path(cfg.markdown).resolve().parent
    return write_json, write_md
