"""`pipeline status`: what each stage has on disk, read from the stages' own markers. Never imports torch."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import records
from pipeline.config import StatusConfig
from pipeline.errors import UserError
from pipeline.runlog import MetricsLog


# --- fetch: img2dataset's per-shard stats files ------------------------------------------------------------
_REASONS = [  # (pattern in img2dataset's error string, reason); first match wins
    (r"HTTP Error (\d+)", None),  # -> "http <code>"
    (r"IncompleteRead|truncated|Premature end", "truncated"),
    (r"timed out|timeout", "timeout"),
    (r"Image decoding error|cannot identify image|decod|imdecode", "not an image / decode error"),
    (r"download deadline exceeded", "download deadline exceeded"),  # pipeline/safe_fetch.py's whole-download cap
    (r"response larger than", "response too large"),  # its byte cap
    (r"address refused", "address refused"),  # link-local, metadata, private hosts the list did not name
    (r"unsupported image", "unsupported image"),
    (r"aspect ratio too large", "aspect ratio too large"),
    (r"Connection refused", "connection refused"),
    (r"Connection reset|Remote end closed|RemoteDisconnected|Connection aborted", "connection dropped"),
    (r"Name or service not known|nodename nor servname|getaddrinfo|name resolution", "dns error"),
    (r"SSL|CERTIFICATE", "ssl error"),
    (r"unknown url type|no host given|Invalid URL", "bad url"),
    (r"redirect refused", "redirect refused"),  # to another scheme or a private address (pipeline/safe_fetch.py)
    (r"image area too large", "image area too large"),  # more than FetchConfig.max_image_area pixels
    (r"X-Robots-Tag", "disallowed by x-robots-tag"),
]


def failure_reason(message: str) -> str:
    """A noisy urllib / OpenCV error string as a short reason (http 404, timeout, truncated, ...)."""
    for pattern, reason in _REASONS:
        m = re.search(pattern, message, re.IGNORECASE)
        if m:
            return reason or f"http {m.group(1)}"
    short = re.sub(r"\d+", "N", message.strip().splitlines()[0] if message.strip() else "unknown")
    return short[:48]


def read_stats(path: Path) -> dict | None:
    """A shard's img2dataset stats, or None when the file is torn or unreadable: that shard is unfinished.

    img2dataset writes `NNNNN_stats.json` in place (not atomically), so a kill can leave it cut short; fetch,
    encode and status all go through this one test.
    """
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or not all(type(s.get(k)) is int for k in ("count", "successes")):
        return None
    return s if 0 <= s["successes"] <= s["count"] and s["count"] == _parquet_rows(path, s["count"]) else None


def _parquet_rows(stats: Path, default: int) -> int:
    """Rows in the shard's `NNNNN.parquet` (img2dataset writes one per input row, fetched or failed), or
    `default` where there is none (shards of another tool). A stats file whose count disagrees is not trusted:
    encode sizes the store by it."""
    parquet = stats.with_name(stats.name[: -len("_stats.json")] + ".parquet")
    if not parquet.is_file():
        return default
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(parquet).num_rows
    except Exception:  # noqa: BLE001 - a torn parquet (pyarrow's own error types): the shard is unfinished
        return -1


def _fetch_record(shards: Path) -> dict | None:
    try:
        return json.loads((shards / "_fetch" / "run.json").read_text())
    except (OSError, ValueError):
        return None


def fetch_summary(shards: Path) -> dict:
    """Counts from img2dataset's `NNNNN_stats.json` files plus the fetch stage's `_fetch/run.json` record.

    A shard is complete when its stats file exists; unfinished = a `.tar` without stats, or a shard id the
    input list implies (rows / samples per shard, from the record) that has no stats yet.
    """
    s: dict = {"path": str(shards), "exists": shards.is_dir(), "shards_complete": 0, "shards_unfinished": 0,
               "shards_expected": 0, "unfinished": [], "rows_requested": 0, "rows_done": 0, "fetched": 0,
               "failed": 0, "success_rate": None, "failures": {}, "source": None, "last_run": None,
               "list_issues": None}
    if not s["exists"]:
        s["state"] = "missing"
        return s
    stats: dict[int, dict] = {}
    tars: set[int] = set()
    for p in shards.iterdir():
        if m := re.fullmatch(r"(\d+)_stats\.json", p.name):
            if (one := read_stats(p)) is not None:  # torn or unreadable: the shard counts as unfinished
                stats[int(m.group(1))] = one
        elif m := re.fullmatch(r"(\d+)\.tar", p.name):
            tars.add(int(m.group(1)))
    record = _fetch_record(shards)
    expected = set(range(int(record["expected_shards"]))) if record and "expected_shards" in record else set()
    unfinished = sorted((expected | tars) - set(stats))
    failures: dict[str, int] = {}
    for st in stats.values():
        s["rows_done"] += int(st.get("count", 0))
        s["fetched"] += int(st.get("successes", 0))
        for msg, n in (st.get("status_dict") or {}).items():
            if msg != "success":
                reason = failure_reason(msg)
                failures[reason] = failures.get(reason, 0) + int(n)
    s["failed"] = s["rows_done"] - s["fetched"]
    s["failures"] = dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
    s["success_rate"] = round(s["fetched"] / s["rows_done"], 4) if s["rows_done"] else None
    s["shards_complete"] = len(stats)
    s["shards_unfinished"] = len(unfinished)
    s["shards_expected"] = len(expected | tars | set(stats))
    s["unfinished"] = [f"{i:05d}" for i in unfinished]
    s["rows_requested"] = int(record["rows"]) if record and "rows" in record else s["rows_done"]
    if record:
        s["source"] = record.get("config", {}).get("source")
        s["last_run"] = {k: record.get(k) for k in ("state", "started_at", "finished_at", "timings")}
        s["list_issues"] = record.get("list_issues")  # rows the url list itself got wrong (kept or dropped)
    if not stats and not unfinished:
        s["state"] = "empty"
    else:
        s["state"] = "complete" if not unfinished else "incomplete"
    return s


def render_fetch(console: Console, s: dict) -> None:
    if s["state"] in ("missing", "empty"):
        why = "does not exist" if s["state"] == "missing" else "holds no shards yet"
        console.print(f"[bold]fetch[/]: {escape(s['path'])} {why}; run `pipeline fetch` (or `make fetch`)", highlight=False)
        return
    t = Table(title=f"fetch: {escape(s['path'])}" + (f"  (source {escape(str(s['source']))})" if s["source"] else ""),
              title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    rate = f"{100 * s['success_rate']:.1f} %" if s["success_rate"] is not None else "-"
    t.add_row("rows asked for", f"{s['rows_requested']:,}")
    t.add_row("rows in complete shards", f"{s['rows_done']:,}")
    t.add_row("images fetched", f"{s['fetched']:,}")
    t.add_row("success rate", rate)
    t.add_row("failed", f"{s['failed']:,}")
    for reason, n in s["failures"].items():
        t.add_row(f"  {reason}", f"{n:,}")
    for issue, n in (s.get("list_issues") or {}).items():
        if n:
            t.add_row(f"list: {issue.replace('_', ' ')}", f"{n:,}")
    colour = "green" if s["shards_unfinished"] == 0 else "yellow"
    t.add_row("shards", f"[{colour}]{s['shards_complete']} complete, {s['shards_unfinished']} unfinished[/]")
    if s["unfinished"]:
        more = f" (+{len(s['unfinished']) - 8})" if len(s["unfinished"]) > 8 else ""
        t.add_row("  unfinished", ", ".join(s["unfinished"][:8]) + more)
    console.print(t)


# --- encode: the zarr feature store ------------------------------------------------------------------------
def _fetched_per_shard(shards: Path) -> dict[str, int]:
    """Samples img2dataset wrote per finished shard (`successes` in `NNNNN_stats.json`), by tar name."""
    out = {}
    for f in sorted(shards.glob("*_stats.json")) if shards.is_dir() else []:
        if (one := read_stats(f)) is not None:
            out[f.name[: -len("_stats.json")] + ".tar"] = one["successes"]
    return out


def store_summary(store: Path, shards: Path) -> dict:
    """Encoded vs fetched samples per shard and in total, encoder + weights provenance, size on disk."""
    from pipeline.store import FeatureStore, weights_label

    s: dict = {"path": str(store), "exists": store.exists()}
    if not s["exists"]:
        return s
    try:
        st = FeatureStore.open(store, require_done=False)
        encoded, done = st.shard_counts(), dict(zip(st.shards, st.shard_done().tolist()))
    except UserError as e:
        return {**s, "error": str(e)}
    fetched = _fetched_per_shard(shards)
    names = st.shards + [n for n in fetched if n not in encoded]  # store row order, then not yet in the store
    per = [{"shard": n, "fetched": fetched.get(n), "encoded": encoded.get(n, 0), "done": bool(done.get(n, False))}
           for n in names]
    n_fetched, n_encoded = sum(fetched.values()), sum(encoded.values())
    enc = st.encoder
    s.update({
        "shards": per, "shards_done": sum(done.values()), "shards_fetched": len(fetched),
        "fetched": n_fetched, "encoded": n_encoded,
        "encoded_of_fetched": sum(encoded.get(n, 0) for n in fetched),
        "coverage": round(sum(encoded.get(n, 0) for n in fetched) / n_fetched, 4) if n_fetched else None,
        "model": enc.get("model"), "weights": enc.get("weights"),
        "weights_label": weights_label(enc.get("weights", {})),
        "random_init": st.is_random_init, "precision": st.attrs.get("precision"),
        "tokens": st.tokens, "width": st.width, "size_bytes": st.size_bytes(), "last_run": st.attrs.get("last_run"),
        "problems": st.attrs.get("problems"),  # encode's record of unreadable shards and skipped images
    })
    return s


def render_store(console: Console, s: dict) -> None:
    if not s["exists"] or "error" in s:
        console.print(f"[bold]store[/]: {escape(s['path'])} " + (f"[red]{escape(s['error'])}[/]" if "error" in s else "missing"))
        return
    cov = f"{100 * s['coverage']:.1f}%" if s["coverage"] is not None else "n/a (no fetched shards found)"
    weights = f"[bold red]{s['weights_label']} - features carry no visual knowledge[/]" if s["random_init"] \
        else s["weights_label"]
    console.print(f"[bold]store[/]: {escape(s['path'])}  {s['encoded_of_fetched']}/{s['fetched']} fetched samples encoded "
                  f"({cov}), {s['encoded']} in store, {s['shards_done']} shards done, "
                  f"{s['size_bytes'] / 2**20:.1f} MiB on disk")
    console.print(f"  encoder: {s['model']} [{s['tokens']}, {s['width']}] {s['precision']}, weights: {weights}",
                  highlight=False)
    problems = s.get("problems") or {}
    bad, skipped = problems.get("unreadable_shards") or {}, problems.get("skipped_images") or {}
    if bad or skipped:
        names = f": {', '.join(list(bad)[:4])}" if bad else ""
        console.print(f"  [yellow]{len(bad)} unreadable shard(s) not encoded{names}; "
                      f"{sum(len(v) for v in skipped.values())} corrupt image(s) skipped[/]", highlight=False)
    todo = [r for r in s["shards"] if r["fetched"] is None or r["encoded"] != r["fetched"] or not r["done"]]
    rows = s["shards"] if len(s["shards"]) <= 12 else todo[:12]
    if rows:
        t = Table("shard", "fetched", "encoded", "done", title=None if rows is s["shards"] else
                  f"shards not fully encoded ({len(todo)} of {len(s['shards'])})")
        for r in rows:
            t.add_row(r["shard"], "-" if r["fetched"] is None else str(r["fetched"]), str(r["encoded"]),
                      "yes" if r["done"] else "[yellow]no[/]")
        console.print(t)


# --- train: run folders ------------------------------------------------------------------------------------
def run_summary(run: Path) -> dict:
    """One run folder, from its config.json, metrics.jsonl, checkpoints/last.json and summary.json; a run
    whose files are malformed is {name, path, error} (the one line naming the file), and the others still show."""
    try:
        return _run_summary(run)
    except UserError as e:
        return {"name": run.name, "path": str(run), "error": str(e)}


def _run_summary(run: Path) -> dict:
    cfg = records.read_config(run)
    ck = records.read_last(run / "checkpoints") or {}
    summ = records.read_summary(run) or {}
    tr, val = MetricsLog(run / "metrics.jsonl").last()
    train_cfg, dec = cfg["train"], cfg["decoder"]
    step = ck.get("step", 0)
    return {
        "name": run.name, "path": str(run), "step": step, "total_steps": summ.get("total_steps"),
        "epochs_done": ck.get("epoch") or 0, "epochs": train_cfg.get("epochs"),
        "complete": bool(summ.get("complete")) and summ.get("steps") == step,
        "checkpoint": ck.get("dir"), "logged_step": tr.get("step"),
        "train_loss_ar": tr.get("loss_ar"), "train_loss_par": tr.get("loss_par"),
        "val_loss_ar": val.get("loss_ar"), "val_loss_par": val.get("loss_par"), "val_step": val.get("step"),
        "random_init": bool(cfg.get("encoder_random_init")), "samples_per_s": summ.get("samples_per_s"),
        "encoder_weights": _weights_kind(cfg["store"]),
        "decoder": f"{dec.get('layers')}x{dec.get('width')}" if dec else None, "store": train_cfg.get("store"),
    }


def _weights_kind(store: dict):
    weights = (store.get("encoder") or {}).get("weights") if isinstance(store.get("encoder"), dict) else None
    kind = weights.get("kind") if isinstance(weights, dict) else None
    return kind if isinstance(kind, str) else None


def runs_summary(runs: Path) -> dict:
    """Every run folder under `runs` (or `runs` itself if it is one): steps, epochs, last losses, checkpoint."""
    s: dict = {"path": str(runs), "exists": runs.is_dir(), "runs": []}
    if s["exists"]:
        folders = [runs] if (runs / "config.json").is_file() else \
            sorted(p for p in runs.iterdir() if (p / "config.json").is_file())
        s["runs"] = [run_summary(p) for p in folders]
    return s


def render_runs(console: Console, s: dict) -> None:
    if not s["runs"]:
        why = "does not exist" if not s["exists"] else "holds no runs yet"
        console.print(f"[bold]runs[/]: {escape(s['path'])} {why}; run `pipeline train` (or `make train`)", highlight=False)
        return

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    from rich import box

    t = Table(box=box.SIMPLE_HEAD, title=f"runs: {escape(s['path'])}", title_justify="left", pad_edge=False)
    t.add_column("run", overflow="fold", min_width=min(16, max(len(r["name"]) for r in s["runs"])))
    t.caption, t.caption_justify = "train / val: loss autoregressive/parallel (nats per token)", "left"
    for name in ("step", "epoch", "train", "val", "ckpt", "samp/s", "encoder"):
        t.add_column(name, no_wrap=True)
    for r in s["runs"]:
        if "error" in r:  # listed below the table
            continue
        total = f"/{r['total_steps']}" if r["total_steps"] else ""
        step = f"[green]{r['step']}{total}[/]" if r["complete"] else f"{r['step']}{total}"
        ckpt = r["checkpoint"].removeprefix("step-").lstrip("0") or "0" if r["checkpoint"] else "[yellow]none[/]"
        t.add_row(r["name"], step, f"{r['epochs_done']}/{r['epochs']}",
                  f"{f(r['train_loss_ar'])}/{f(r['train_loss_par'])}", f"{f(r['val_loss_ar'])}/{f(r['val_loss_par'])}",
                  ckpt, "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.1f}",
                  "[bold red]random[/]" if r["random_init"] else (r["encoder_weights"] or "-"))
    console.print(t)
    for r in s["runs"]:
        if "error" in r:
            console.print(f"  [red]run {escape(r['name'])} is unreadable: {escape(r['error'])}[/]", highlight=False)


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
