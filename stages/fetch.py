"""Stage one: a (caption, url) list -> img2dataset -> WebDataset shards, with a progress bar and a summary."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from pathlib import Path

from pipeline import status as st
from pipeline.config import FetchConfig, to_jsonable
from pipeline.errors import UserError
from pipeline.osutil import SignalScope, printable
from pipeline.ownership import check, claim

MAX_JPEG_SIDE = 65500  # OpenCV's JPEG encoder refuses a longer side (pipeline/safe_fetch.py)

# Our own records live in a sub-folder: img2dataset reads EVERY top-level *.json as a shard's stats file.
RUN_DIR = "_fetch"
RECORD = "run.json"
LOG = "img2dataset.log"
DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark", "ray": "ray"}


def record_path(shards: Path) -> Path:
    """Where the stage records its config, list fingerprint and wall times (the benchmark reads it)."""
    return Path(shards) / RUN_DIR / RECORD


def _validate(cfg: FetchConfig) -> None:
    """What the option's own rule (pipeline/config.py) cannot know: whether its engine is installed."""
    module = DISTRIBUTORS[cfg.distributor]
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"--distributor {cfg.distributor} needs {module}, which is not installed: "
                        f"pip install {module} (or cappa-pipeline[{'spark' if module == 'pyspark' else module}])")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _fetched_here(shards: Path) -> bool:
    """A shards folder this stage fetched before folders carried a marker: it holds our record."""
    try:
        rec = json.loads(record_path(shards).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and isinstance(rec.get("fingerprint"), dict)


def _drawn_here(root: Path) -> bool:
    """A synthetic folder this stage drew before folders carried a marker: our manifest, our
    urls.parquet and drawings named as ours (.tmp: a killed drawing), nothing else."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        names = os.listdir(root / "images") if (root / "images").is_dir() else []
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and {"version", "seed", "count"} <= manifest.keys()
            and all(re.fullmatch(r"images|(manifest\.json|urls\.parquet)(\.tmp)?", n)
                    for n in os.listdir(root))
            and all(re.fullmatch(r"\d{8}\.jpg(\.tmp\d+)?", n) for n in names))


def _claim_folders(cfg: FetchConfig) -> None:
    """The shards folder, and the synthetic folder (its images of another seed are deleted), are
    ours to write: never a user's. Both are checked before either is created."""
    folders = [(Path(cfg.shards), "shards", "pipeline fetch", "shards folder", _fetched_here)]
    if cfg.source == "synthetic":
        folders.append((Path(cfg.synthetic_dir), "synthetic", "pipeline fetch --source synthetic",
                        "--synthetic-dir folder", _drawn_here))
    for folder, kind, _, noun, legacy in folders:
        check(folder, kind, noun, legacy)
    for folder, kind, stage, noun, legacy in folders:
        claim(folder, kind, stage, noun, legacy)
    if cfg.source == "synthetic":
        _check_manifest(Path(cfg.synthetic_dir))


def _check_manifest(root: Path) -> None:
    manifest = root / "manifest.json"
    if manifest.exists() or manifest.is_symlink():
        try:
            ok = not manifest.is_symlink() and isinstance(json.loads(manifest.read_text()), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{printable(str(manifest))} is not a manifest this tool wrote (not "
                            f"a JSON object): delete {printable(str(root))} (it is drawn again) or "
                            "use another --synthetic-dir")


def _check_same_list(shards: Path, fingerprint: dict) -> None:
    """Incremental mode trusts shard ids, so a folder fetched from another list must not be 'resumed'."""
    rec = record_path(shards)
    has_shards = shards.is_dir() and any(re.fullmatch(r"\d+(\.tar|_stats\.json)", p.name) for p in shards.iterdir())
    if not has_shards or not rec.exists():
        return
    try:
        old = json.loads(rec.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return
    if old != fingerprint:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if (old or {}).get(k) != v)
        raise UserError(f"{shards} holds shards of another list ({diff}); use another --shards folder or delete it")


def _done_ids(shards: Path) -> set[int]:
    """Shards img2dataset finished: a stats file that reads whole (a torn one is what a kill mid-write leaves)."""
    if not shards.is_dir():
        return set()
    return {int(m.group(1)) for p in shards.iterdir()
            if (m := re.fullmatch(r"(\d+)_stats\.json", p.name)) and st.read_stats(p) is not None}


def _set_aside_torn_stats(shards: Path) -> list[str]:
    """Move torn stats files to `_fetch/torn/`: img2dataset skips any shard whose stats file merely exists."""
    torn = [p for p in sorted(shards.glob("*_stats.json"))
            if re.fullmatch(r"\d+_stats\.json", p.name) and st.read_stats(p) is None]
    if torn:
        dest = shards / RUN_DIR / "torn"
        dest.mkdir(parents=True, exist_ok=True)
        for p in torn:  # kept, not deleted: nothing here removes what it did not make
            os.replace(p, dest / f"{p.stem}.{time.time_ns()}.json")
    return [p.name[:5] for p in torn]


def _tar_samples(path: Path) -> int:
    """Samples written so far to a tar that img2dataset is still writing (stops at the torn end)."""
    n = 0
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                n += m.name.endswith(".json")
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def _progress_rows(shards: Path, todo: list[int], sizes: dict[int, int]) -> int:
    """Rows handled so far: whole shards once their stats exist, else the samples already in their tar."""
    done = 0
    for i in todo:
        stats = shards / f"{i:05d}_stats.json"
        if stats.exists() and st.read_stats(stats) is not None:
            done += sizes[i]
        elif (tar := shards / f"{i:05d}.tar").exists():
            done += min(_tar_samples(tar), sizes[i])
    return done


def _img2dataset_main(kwargs: dict, log_path: str, allowed_hosts: frozenset = frozenset(),
                      max_image_area: float = float("inf"), parent_pid: int | None = None) -> None:
    """Child process: img2dataset with its prints, tqdm bars and worker output sent to a log file.

    It leads its own process group, which its logger and pool workers inherit, so the parent can stop all of
    them at once and they all die with a killed parent (pipeline/proc_group.py).
    """
    if parent_pid is not None:
        from pipeline import proc_group

        proc_group.become_group_leader(parent_pid)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # its spawned workers inherit these descriptors
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # webdataset imports torch only for its DataLoader mix-ins and falls back when torch is absent; this
    # coordinating process never needs it, and importing torch doubles its start-up (~3 s on 2 cores).
    sys.modules.setdefault("torch", None)  # type: ignore[assignment]
    import functools

    import img2dataset  # noqa: F401 - its package attribute `main` is a function: take the module itself

    from pipeline import safe_fetch

    i2d = sys.modules["img2dataset.main"]

    # http(s) only, no redirects into private networks, no decompression bombs (pipeline/safe_fetch.py)
    i2d.Downloader = functools.partial(safe_fetch.GuardedDownloader, allowed_hosts=allowed_hosts,
                                       max_image_area=max_image_area)
    i2d.download(**kwargs)


def _img2dataset_kwargs(cfg: FetchConfig, url_list: Path, extra: list[str]) -> dict:
    return dict(
        url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=extra or None,
        output_folder=str(cfg.shards), output_format="webdataset", number_sample_per_shard=cfg.samples_per_shard,
        image_size=cfg.image_size, resize_mode="keep_ratio", resize_only_if_bigger=False,  # shortest side = size
        processes_count=cfg.processes, thread_count=cfg.threads, distributor=cfg.distributor,
        timeout=cfg.timeout, retries=cfg.retries, incremental_mode="incremental", min_image_size=cfg.min_image_size,
        enable_wandb=False, compute_hash=None, max_image_area=cfg.max_image_area,
        max_aspect_ratio=MAX_JPEG_SIDE / cfg.image_size,  # the resized long side must fit a JPEG
    )


def _download(cfg: FetchConfig, url_list: Path, extra: list[str], n_rows: int, todo: list[int],
              signals: "_Signals") -> None:
    import pyarrow.parquet as pq

    from pipeline.progress import make_progress
    from pipeline.safe_fetch import private_hosts

    shards = Path(cfg.shards)
    sps = cfg.samples_per_shard
    sizes = {i: min(sps, n_rows - i * sps) for i in todo}
    log = shards / RUN_DIR / LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    proc = mp.get_context("spawn").Process(
        target=_img2dataset_main, daemon=False,
        args=(_img2dataset_kwargs(cfg, url_list, extra), str(log),
              private_hosts(pq.read_table(url_list, columns=["url"]).column("url").to_pylist()), cfg.max_image_area,
              os.getpid()))
    proc.start()
    try:
        with make_progress() as progress:
            task = progress.add_task(f"fetching {len(todo)} shards", total=sum(sizes.values()), unit="img")
            while proc.is_alive():
                progress.update(task, completed=_progress_rows(shards, todo, sizes))
                proc.join(0.5)
            progress.update(task, completed=_progress_rows(shards, todo, sizes))
    finally:
        _stop_all(proc, signals)
    if proc.exitcode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise UserError(f"img2dataset failed (exit code {proc.exitcode}): {last[:200]} (log: {log})")


def _stop_all(proc, signals: "_Signals") -> None:
    """img2dataset's group is not ours, so a terminal's Ctrl-C reached only us: stop all of it (SIGINT first,
    for img2dataset's own clean-up). On a normal exit this finds nobody, or stray workers. A first signal that
    lands in here is re-raised once everything is stopped."""
    from pipeline import proc_group

    late = False
    while True:
        try:
            proc_group.stop(proc, hurry=lambda: signals.count > 1)
            break
        except KeyboardInterrupt:
            late = True
    if late:
        raise KeyboardInterrupt


def _list_digest(df) -> str:
    h = hashlib.sha256()
    for cap, url in zip(df["caption"], df["url"]):
        h.update(cap.encode() + b"\t" + url.encode() + b"\n")
    return h.hexdigest()[:16]


class _Signals(SignalScope):
    """SIGINT and SIGTERM (a scheduler's) both interrupt the fetch once; a second one hurries the clean-up."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            raise KeyboardInterrupt


def run(cfg: FetchConfig) -> dict:
    """Fetch cfg.source into cfg.shards; returns the fetch summary (same dict as `pipeline status`).

    `<shards>.lock` (pipeline/lock.py) makes a second fetch into the same folder refuse with one line.
    Ctrl-C or SIGTERM stops img2dataset and all its processes, then exits 2 saying to rerun.
    """
    from pipeline.lock import FolderLock

    _validate(cfg)
    with _Signals() as signals:
        try:
            with FolderLock(Path(cfg.shards), who="fetch", noun="the shards folder"):
                return _run(cfg, signals)
        except KeyboardInterrupt:  # before or after the download (during it, _run records it itself)
            raise UserError(f"fetch interrupted before it finished; run the same command again to resume "
                            f"({cfg.shards})") from None
        except OSError as e:  # a full or read-only disk, a path under a file: mkdir, run.json, the log, images
            where = f"{e.filename}" if e.filename else str(cfg.shards)
            raise UserError(f"cannot write {where}: {e.strerror or e}; make room (or make the folder writable), "
                            "then run the same command again (finished shards are kept)") from None


@dataclasses.dataclass
class _Source:
    """The list to fetch: its rows, the extra columns kept, the fingerprint a rerun must match."""

    rows: int
    extra: list[str]
    fingerprint: dict
    issues: dict | None = None  # what a url list itself got wrong (sources.read_url_list counts it)
    df: object = None  # the url list's DataFrame; None for the synthetic source, drawn later


def _run(cfg: FetchConfig, signals: _Signals) -> dict:
    """Under the folder lock: check the folder, fetch the shards not yet complete, record the run
    in `_fetch/run.json` and print it; a Ctrl-C during the download is recorded, not raised."""
    from rich.console import Console

    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    shards = Path(cfg.shards)
    console = Console(stderr=True)
    timings: dict[str, float] = {}
    interrupted = False
    with contextlib.ExitStack() as stack:  # holds the synthetic source's loopback server
        src = _read_source(cfg, console)
        _claim_folders(cfg)
        _check_same_list(shards, src.fingerprint)
        _set_aside_torn(shards, console)
        expected = math.ceil(src.rows / cfg.samples_per_shard)
        todo = sorted(set(range(expected)) - _done_ids(shards))
        _print_plan(cfg, src.rows, expected, todo, console)
        record = {"fingerprint": src.fingerprint, "config": to_jsonable(cfg), "rows": src.rows,
                  "samples_per_shard": cfg.samples_per_shard, "expected_shards": expected,
                  "shards_todo": len(todo), "state": "running", "started_at": started,
                  **({"list_issues": src.issues} if src.issues is not None else {})}
        if todo:
            shards.mkdir(parents=True, exist_ok=True)
            url_list = _url_list(cfg, src, stack, timings)
            _write_json(record_path(shards), record)
            t = time.perf_counter()
            try:
                _download(cfg, url_list, src.extra, src.rows, todo, signals)
            except KeyboardInterrupt:
                interrupted = True
            timings["download_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    summary = st.fetch_summary(shards)
    state = "interrupted" if interrupted else \
        "done" if summary["shards_unfinished"] == 0 else "incomplete"
    if todo or not record_path(shards).exists():
        summary = _finish_record(shards, record, state, timings, summary)
    _print_result(cfg, summary, src.rows, todo, timings)
    if state != "done":
        raise UserError(f"{summary['shards_unfinished']} of {expected} shards unfinished"
                        f"{' (interrupted)' if interrupted else ''}; run the same command again to "
                        f"finish them (img2dataset's log: {shards / RUN_DIR / LOG})")
    return summary


def _read_source(cfg: FetchConfig, console) -> _Source:
    """The synthetic source's size, or the url list read (its problems printed as one line)."""
    if cfg.source == "synthetic":
        from pipeline import synthetic

        src = _Source(cfg.count, ["attributes", "references"],
                      {"source": "synthetic", "seed": cfg.seed, "count": cfg.count,
                       "broken_fraction": cfg.broken_fraction,
                       "generator": synthetic.GENERATOR_VERSION})
    else:
        from pipeline import sources

        df = sources.read_url_list(cfg.source, cfg.count)
        src = _Source(len(df), [c for c in sources.EXTRA_COLUMNS if c in df.columns],
                      {"source": str(Path(cfg.source).resolve()), "count": len(df),
                       "digest": _list_digest(df)},
                      issues=df.attrs.get("issues"), df=df)
        if src.issues and any(src.issues.values()):
            console.print("[yellow]url list: " + ", ".join(
                f"{n} {k.replace('_', ' ')}" for k, n in src.issues.items() if n)
                + " (see docs/RELIABILITY.md)[/]", highlight=False)
    # the shards depend on these too: a rerun with other values must not resume the folder
    src.fingerprint.update(samples_per_shard=cfg.samples_per_shard, image_size=cfg.image_size)
    return src


def _set_aside_torn(shards: Path, console) -> None:
    from rich.markup import escape

    if torn := _set_aside_torn_stats(shards) if shards.is_dir() else []:
        console.print(f"[yellow]torn stats file of shard {', '.join(torn)} (a fetch killed while "
                      f"writing it): fetched again (the torn file is kept in "
                      f"{escape(str(shards / RUN_DIR / 'torn'))})[/]", highlight=False)


def _print_plan(cfg: FetchConfig, rows: int, expected: int, todo: list[int], console) -> None:
    from rich.markup import escape

    console.print(f"[bold]fetch[/] {escape(str(cfg.source))} ({rows} rows) -> "
                  f"{escape(str(Path(cfg.shards)))}: {expected} shards of {cfg.samples_per_shard}, "
                  f"{expected - len(todo)} already complete", highlight=False)


def _url_list(cfg: FetchConfig, src: _Source, stack: contextlib.ExitStack,
              timings: dict[str, float]) -> Path:
    """The parquet url list img2dataset reads. The synthetic source is drawn first and served
    from a loopback server that `stack` keeps up until the download is over."""
    from pipeline import sources, synthetic
    from pipeline.loopback import serve
    from pipeline.progress import make_progress

    if cfg.source != "synthetic":
        return sources.write_parquet(src.df, Path(cfg.shards) / RUN_DIR / "urls.parquet")
    t = time.perf_counter()
    with make_progress() as progress:
        rows = synthetic.generate(Path(cfg.synthetic_dir), cfg.seed, cfg.count, cfg.broken_fraction,
                                  processes=cfg.processes, progress=progress)
    timings["generate_s"] = round(time.perf_counter() - t, 3)
    base_url = stack.enter_context(serve(Path(cfg.synthetic_dir) / "images"))
    url_list = Path(cfg.synthetic_dir) / "urls.parquet"
    synthetic.write_url_list(url_list, rows, base_url)  # the port is new each run: rewrite
    return url_list


def _finish_record(shards: Path, record: dict, state: str, timings: dict, summary: dict) -> dict:
    """The run record completed with its outcome; returns the summary read again with it."""
    record.update(state=state, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), timings=timings,
                  result={k: summary[k] for k in ("rows_done", "fetched", "failed", "success_rate",
                                                 "shards_complete", "shards_unfinished",
                                                 "failures")})
    if not shards.is_dir():
        return summary
    _write_json(record_path(shards), record)
    return st.fetch_summary(shards)  # again, so it shows this record (what `pipeline status` shows)


def _print_result(cfg: FetchConfig, summary: dict, rows: int, todo: list[int],
                  timings: dict) -> None:
    """The status table (as `pipeline status` prints it), then the wall times and download rate."""
    from rich.console import Console

    out = Console()
    st.render_fetch(out, summary)
    finished = _done_ids(Path(cfg.shards))
    sps = cfg.samples_per_shard
    n_done = sum(min(sps, rows - i * sps) for i in todo if i in finished)
    rate = f", {n_done / timings['download_s']:.1f} rows/s" if timings.get("download_s") else ""
    out.print(f"wall time {timings['total_s']:.1f} s"
              + (f" (drawing {timings['generate_s']:.1f} s)" if "generate_s" in timings else "")
              + (f", download {timings['download_s']:.1f} s{rate}" if "download_s" in timings else "")
              + ("" if todo else " — nothing to do, every shard is complete"), highlight=False)
