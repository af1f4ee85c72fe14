"""`pipeline verify`: read a feature store and/or a run folder end to end and check every byte that has a digest.

Store: the attributes against the arrays' shapes, every chunk of every column of every done shard decoded
(crc32c checked where the store has it), chunks missing from disk named, every valid row's key present. Run
folder: config.json, summary.json, best.json + best.safetensors (its sha256), metrics.jsonl (strict JSON, one
object per line), every checkpoint against its manifest's sha256, and that last.json points at a good one.
One line per problem; problems -> exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from pipeline.errors import UserError
from pipeline.progress import console


def verify_store(path: Path) -> dict:
    """Every array a reader trusts, for every done shard: the attributes against the arrays' shapes (on open),
    chunks missing on disk, each chunk of valid/keys/captions/meta/features decoded (checksums where the store
    has them), and every valid row's key present."""
    from pipeline.store import STRING_ARRAYS, FeatureStore

    st = FeatureStore.open(path, require_done=False)  # attributes and shapes: one line if they do not fit
    done = st.shard_done()
    problems: dict[str, str] = dict(st.missing_chunks())
    for s in [int(i) for i in done.nonzero()[0]]:
        name = st.shards[s]
        if name in problems:
            continue
        a, b = st.region(s)
        bad = []
        for col in ("valid", *STRING_ARRAYS):
            try:
                values = st.arrays[col][a:b]
            except Exception as e:  # noqa: BLE001 - each codec raises its own type
                bad.append(f"{col} chunk cannot be read ({type(e).__name__})")
                continue
            if col == "keys" and not bad and any(not k for k in values[st.arrays["valid"][a:b]]):
                bad.append("valid rows without a key")
        try:
            st.read(a, b)
        except UserError:
            bad.append("features chunk checksum mismatch (crc32c)")
        if bad:
            problems[name] = "; ".join(bad)
    return {"path": str(path), "checksums": st.has_checksums, "shards": len(st.shards),
            "shards_done": int(done.sum()), "problems": problems}


def _run_files(run: Path) -> dict[str, str]:
    """Problems in config.json, summary.json, best.json + best.safetensors, checkpoints/last.json and
    metrics.jsonl: {file: why}.

    The readers are the ones training, eval and status use; metrics.jsonl is also held to strict JSON (no NaN),
    and a torn last line (what a kill mid-append leaves) is reported but ignored by every reader."""
    from pipeline import early_stop, records

    problems: dict[str, str] = {}
    readers = (records.read_config, records.read_summary, early_stop.best_checkpoint,
               lambda r: records.read_last(r / "checkpoints"))
    for read in readers:
        try:
            read(run)
        except records.BadRunFile as e:
            problems[e.file.name] = e.why

    def refuse(c):
        raise ValueError(c)

    try:
        records.read_metrics(run / records.METRICS)
    except records.BadRunFile as e:
        problems[e.file.name] = e.why
        return problems
    lines = (run / records.METRICS).read_bytes().decode().split("\n") if (run / records.METRICS).is_file() else []
    for i, line in enumerate(lines):
        try:
            if line.strip():
                json.loads(line, parse_constant=refuse)
        except ValueError:
            torn = i == len(lines) - 1
            problems[f"metrics.jsonl:{i + 1}"] = "torn last line (ignored by readers)" if torn else "not strict JSON"
    return problems


def verify_run(run: Path) -> dict:
    from pipeline import checkpoint

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    problems = _run_files(run)
    ckpts = run / "checkpoints"
    good = []
    for p in sorted(ckpts.glob("step-*")) if ckpts.is_dir() else []:
        why = checkpoint.check(p)
        if why:
            problems[p.name] = why
        elif (p / "manifest.json").is_file():
            good.append(p.name)
        else:
            good.append(p.name + " (no digest)")
    pointed = checkpoint.last(ckpts) if ckpts.is_dir() else None
    if pointed is not None and pointed.name in problems:
        problems["last.json"] = f"points at {pointed.name}, which is corrupt (loading falls back to an older one)"
    return {"path": str(run), "checkpoints_good": good, "problems": problems}


def run(store: Path | None, run_dir: Path | None) -> dict:
    if store is None and run_dir is None:
        raise UserError("nothing to verify: pass --store and/or --run")
    out, n = {}, 0
    if store is not None:
        s = out["store"] = verify_store(Path(store))
        note = "" if s["checksums"] else " (no checksums: made before crc32c; only missing chunks can be found)"
        console.print(f"store {escape(s['path'])}: {s['shards_done']}/{s['shards']} shards done, "
                      f"{len(s['problems'])} bad{escape(note)}", highlight=False)
        for name, why in s["problems"].items():
            console.print(f"  shard {escape(name)}: {escape(why)}", highlight=False)
        n += len(s["problems"])
    if run_dir is not None:
        r = out["run"] = verify_run(Path(run_dir))
        console.print(f"run {escape(r['path'])}: {len(r['checkpoints_good'])} good checkpoint(s), "
                      f"{len(r['problems'])} problem(s)", highlight=False)
        for name, why in r["problems"].items():
            console.print(f"  {escape(name)}: {escape(why)}", highlight=False)
        n += sum(1 for k in r["problems"] if not r["problems"][k].startswith("torn last line"))
    if n:
        raise UserError(f"verify found {n} problem(s) (listed above)")
    return out
