"""Encode stage: WebDataset shards -> frozen ViT -> zarr feature store (streamed, resumable, torchrun-aware)."""

from __future__ import annotations

import io
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.markup import escape

from pipeline.config import EncodeConfig
from pipeline.errors import UserError
from pipeline.progress import console, make_progress
from pipeline.status import read_stats
from pipeline.store import FeatureStore, StoreLock, encoder_mismatch, weights_label

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_END = object()


# --- shards on disk -----------------------------------------------------------------------------------------
def complete_shards(folder: Path) -> list[tuple[str, Path, dict]]:
    """(name, tar path, img2dataset stats) of every shard img2dataset finished (its stats file exists), sorted."""
    if not folder.is_dir():
        raise UserError(f"no shards folder {folder}: run `pipeline fetch` first")
    out = []
    for tar in sorted(folder.glob("*.tar")):
        # a torn stats file (a fetch killed while writing it, or writing it now): the shard is not finished
        if (stats := read_stats(tar.with_name(tar.stem + "_stats.json"))) is not None:
            out.append((tar.name, tar, stats))
    if not out:
        raise UserError(f"no finished shards in {folder} (a shard is finished when its _stats.json exists)")
    return out


def iter_shard(tar: Path):
    """(key, image bytes, caption, json text) per sample, in the shard's own order (webdataset 0.2 API)."""
    import webdataset as wds

    same = lambda urls: urls  # noqa: E731 - shards are split across ranks by this stage, not by webdataset
    ds = wds.WebDataset(str(tar), shardshuffle=False, nodesplitter=same, workersplitter=same, empty_check=False)
    for s in ds:
        img = next((s[e] for e in IMAGE_EXTS if e in s), None)
        if img is None:
            continue
        txt, js = s.get("txt", b""), s.get("json", b"")
        # errors="replace": a stray byte in one caption must not cost the whole shard
        yield (s["__key__"], img, txt.decode("utf-8", errors="replace"),
               js.decode("utf-8", errors="replace") if isinstance(js, bytes) else "")


def shard_error(e: BaseException) -> str:
    """One line for an unreadable tar (webdataset appends the stream and url to tarfile's message)."""
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return f"{type(e).__name__}: {msg.split(' @ ')[0]}"


# --- store preparation (rank 0 only) ------------------------------------------------------------------------
def _describe(enc, precision: str) -> dict:
    return {"model": enc["model"], "weights": enc["weights"], "preprocessing": enc["preprocessing"],
            "precision": precision, "tokens": enc["tokens"], "width": enc["width"]}


def _mismatch(st: FeatureStore, enc: dict, precision: str) -> str | None:
    why = encoder_mismatch(st.encoder, enc)
    if why is None and st.attrs.get("precision") != precision:
        why = f"precision {st.attrs.get('precision')} vs {precision}"
    return why


def prepare_store(cfg: EncodeConfig, enc: dict, precision: str, shards: list) -> str | None:
    """Create, validate or extend the store for `shards`; returns a user-error message or None."""
    names = [n for n, _, _ in shards]
    capacity = cfg.shard_capacity or max(int(s.get("count", 0)) for _, _, s in shards)
    biggest = max(shards, key=lambda s: int(s[2].get("count", 0)))
    path = cfg.store
    if capacity * enc["tokens"] * enc["width"] * 2 > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        return (f"a shard of {capacity} rows (shard {biggest[0]}'s _stats.json says {biggest[2]['count']}) would "
                "not fit in memory: check that file (delete it and rerun `pipeline fetch` to refetch the shard)")
    try:
        if path.exists() and not cfg.overwrite:
            st = FeatureStore.open_for_write(path)
            why = _mismatch(st, enc, precision)
            if why:
                return (f"{path} was encoded with another encoder ({why}); use another --store, "
                        "or --overwrite to replace it")
            if int(biggest[2].get("count", 0)) > st.shard_capacity:
                return (f"shard {biggest[0]} has {biggest[2]['count']} rows, more than the store's shard capacity "
                        f"{st.shard_capacity}; use --overwrite to rebuild the store")
            new = [n for n in names if n not in set(st.shards)]
            st.extend(new)
            return None
        if int(biggest[2].get("count", 0)) > capacity:
            return f"--shard-capacity {capacity} is below shard {biggest[0]}'s {biggest[2]['count']} rows"
        import timm
        import torch

        FeatureStore.create(
            path, encoder=enc, tokens=enc["tokens"], width=enc["width"], shard_capacity=capacity, shards=names,
            overwrite=cfg.overwrite,
            attrs={"preprocessing": enc["preprocessing"], "precision": precision,
                   "versions": {"timm": timm.__version__, "torch": torch.__version__.split("+")[0],
                                **_lib_versions()}})
        return None
    except UserError as e:
        return str(e)
    except OSError as e:  # a full or read-only disk while creating or extending the store
        return store_write_error(path, e)


def store_write_error(path: Path, e: OSError) -> str:
    """One line for a failed store write; done shards are on disk and the failed one is not marked done."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return (f"cannot write the feature store {path}: {e.strerror or e}{where}; make room (or make it writable), "
            "then rerun the same command: shards already marked done are kept, the rest is encoded again")


def _lib_versions() -> dict:
    import webdataset
    import zarr

    return {"zarr": zarr.__version__, "webdataset": webdataset.__version__, "numpy": np.__version__}


# --- the streaming loop -------------------------------------------------------------------------------------
def _decode(encoder, data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return encoder.preprocess(im)  # [3, H, W]; PIL decode + resize release the GIL


def _produce(jobs, encoder, pool, q: queue.Queue, batch_size: int, stop: threading.Event) -> None:
    """Reader thread: per shard, batches of decode futures (batches never cross shards: same batches on rerun).

    A tar that cannot be read to its end (torn, or fewer samples than its stats file says) is reported as
    ("bad", ...) instead of "end": the main thread drops what it holds of that shard and goes on.
    """
    try:
        for pos, name, tar, *expected in jobs:
            batch, n = [], 0
            try:
                for key, img, cap, meta in iter_shard(tar):
                    n += 1
                    batch.append((key, cap, meta, pool.submit(_decode, encoder, img)))
                    if len(batch) == batch_size:
                        q.put(("batch", pos, name, batch))
                        batch = []
                    if stop.is_set():
                        return
                want = expected[0] if expected else None
                if want is not None and n != want:  # a tar cut at a member boundary reads "fine"
                    raise EOFError(f"the tar holds {n} samples, its stats file says {want}")
            except Exception as e:  # noqa: BLE001 - any unreadable tar: skip this shard, keep the others
                q.put(("bad", pos, name, shard_error(e)))
                continue
            if batch:
                q.put(("batch", pos, name, batch))
            q.put(("end", pos, name, None))
    except BaseException as e:  # surfaced in the main thread
        q.put(("error", None, None, e))
    finally:
        q.put(_END)


def _test_kill(what: str, n: int) -> None:
    """Fault-injection hook for the resume tests: PIPELINE_TEST_KILL=batch:3 or shard:1 -> SIGKILL self."""
    spec = os.environ.get("PIPELINE_TEST_KILL", "")
    if spec == f"{what}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def _empty_shard() -> dict:
    return {"feats": [], "keys": [], "caps": [], "meta": []}


def _write_shard(store: FeatureStore, name: str, region: tuple, skipped: dict, nth: int) -> None:
    """Store-writer thread: one shard's rows into its region, then its skipped images recorded."""
    store.write_shard(*region)
    if int(os.environ.get("RANK", "0")) == 0:  # recorded as the shard is done: survives a kill
        _record_shard_problems(store, name, skipped)
    _test_kill("shard", nth)


class _ShardEncoder:
    """The main thread's side of encode_shards: encodes batches, gathers the current shard's rows
    and hands each whole shard to the store-writer thread."""

    def __init__(self, encoder, store: FeatureStore, writer: ThreadPoolExecutor):
        self.encoder, self.store, self.writer = encoder, store, writer
        self.stats = {"images": 0, "shards": 0, "model_s": 0.0, "skipped": 0, "skipped_images": {},
                      "bad_shards": {}}
        self.shard = _empty_shard()
        self.shard_images = 0  # counted in stats["images"] already; taken back if the shard is bad
        self.batches = 0
        self.pending_write = None

    def drop_shard(self, name: str, why: str) -> None:
        """Nothing of an unreadable shard is written: it stays not done, the rest goes on."""
        self.shard = _empty_shard()
        self.stats["images"] -= self.shard_images
        self.shard_images = 0
        self.stats["bad_shards"][name] = why
        console.print(f"[yellow]skipped shard {name}: {escape(why)}[/]")

    def finish_shard(self, pos: int, name: str) -> None:
        """Shard `name` was read whole: write it (and mark it done) while the next one encodes."""
        self.wait_write()  # one write in flight: at most two shards' rows are held in memory
        s = self.shard
        feats = np.concatenate(s["feats"]) if s["feats"] else \
            np.zeros((0, self.store.tokens, self.store.width), np.float16)  # [N, T, E]
        self.stats["shards"] += 1
        skipped = dict(self.stats["skipped_images"].get(name, {}))  # a copy: later shards add keys
        region = (pos, feats, s["keys"], s["caps"], s["meta"])
        self.pending_write = self.writer.submit(_write_shard, self.store, name, region, skipped,
                                                self.stats["shards"])
        self.shard = _empty_shard()
        self.shard_images = 0

    def encode_batch(self, name: str, batch: list) -> None:
        """One batch of (key, caption, json, decode future) through the encoder into the shard."""
        import torch

        tensors, keep = [], []
        for key, cap, meta, fut in batch:
            try:
                tensors.append(fut.result())
                keep.append((key, cap, meta))
            except Exception as e:  # a corrupt image: skip it, the same way on every run
                self.stats["skipped"] += 1
                why = f"{type(e).__name__}: {e}"[:200]
                self.stats["skipped_images"].setdefault(name, {})[key] = why
                console.print(f"[yellow]skipped {name}/{key}: {type(e).__name__}: "
                              f"{escape(str(e))}[/]")
        if tensors:
            x = torch.stack(tensors)  # [B, 3, H, W]
            if self.encoder.device.type == "cuda":
                x = x.pin_memory()
            t0 = time.perf_counter()
            feats = self.encoder.forward(x)  # [B, T, E] float16 (synchronises: .cpu())
            self.stats["model_s"] += time.perf_counter() - t0
            self.shard["feats"].append(feats)
            for key, cap, meta in keep:
                self.shard["keys"].append(key)
                self.shard["caps"].append(cap)
                self.shard["meta"].append(meta)
        self.stats["images"] += len(tensors)
        self.shard_images += len(tensors)
        self.batches += 1

    def wait_write(self) -> None:
        """Surfaces the last write's error (an OSError of a full disk) in the main thread."""
        if self.pending_write is not None:
            self.pending_write.result()


def encode_shards(encoder, store: FeatureStore, jobs: list, cfg: EncodeConfig, progress=None,
                  task=None) -> dict:
    """Encode `jobs` [(position, name, tar, expected samples or None)] into their store regions;
    returns counts and timings."""
    q: queue.Queue = queue.Queue(maxsize=max(2, cfg.workers))  # bounded: memory stays flat
    stop = threading.Event()
    pool = ThreadPoolExecutor(max(1, cfg.workers), thread_name_prefix="decode")
    writer = ThreadPoolExecutor(1, thread_name_prefix="store-write")  # write shard k, encode k+1
    reader = threading.Thread(target=_produce, args=(jobs, encoder, pool, q, cfg.batch_size, stop),
                              daemon=True)
    shard_encoder = _ShardEncoder(encoder, store, writer)
    reader.start()
    try:
        while (item := q.get()) is not _END:
            kind, pos, name, payload = item
            if kind == "error":
                raise payload
            if kind == "bad":
                shard_encoder.drop_shard(name, payload)
            elif kind == "end":
                shard_encoder.finish_shard(pos, name)
            else:
                shard_encoder.encode_batch(name, payload)
                if progress is not None:
                    progress.update(task, advance=len(payload))
                _test_kill("batch", shard_encoder.batches)
        shard_encoder.wait_write()
    finally:
        _stop_threads(reader, q, stop, pool, writer)
    return shard_encoder.stats


def _stop_threads(reader: threading.Thread, q: queue.Queue, stop: threading.Event,
                  pool: ThreadPoolExecutor, writer: ThreadPoolExecutor) -> None:
    """On success or error: the reader, the decoders and the writer all end before we return."""
    stop.set()
    while reader.is_alive():  # unblock a reader waiting on a full queue
        try:
            q.get_nowait()
        except queue.Empty:
            reader.join(0.05)
    pool.shutdown(wait=True, cancel_futures=True)
    writer.shutdown(wait=True)  # a write in flight finishes before we return


def run(cfg: EncodeConfig) -> dict:
    """Encode every finished shard not yet done in the store; prints a summary and returns it."""
    t_start = time.perf_counter()
    shards = complete_shards(Path(cfg.shards))  # before the slow imports: a missing folder fails at once
    from pipeline.dist import Dist

    dist = Dist()
    encoder, device, precision = _start_encoder(cfg, dist)
    enc = encoder.provenance
    lock = StoreLock(cfg.store)
    _prepare_on_rank0(cfg, dist, lock, enc, precision, shards)
    try:
        store = FeatureStore.open_for_write(cfg.store)
        done = store.shard_done()
        pos_of = {n: i for i, n in enumerate(store.shards)}
        todo = [(pos_of[n], n, tar, st) for n, tar, st in shards if not done[pos_of[n]]]
        mine = todo[dist.rank::dist.world]  # disjoint shards -> disjoint regions -> disjoint chunks
        if dist.rank == 0:
            random = enc["weights"]["kind"] == "random-init"
            console.print(f"encode: {len(todo)} of {len(shards)} shards to do ({dist.world} "
                          f"rank(s)), {enc['model']}, weights {weights_label(enc['weights'])}, "
                          f"on {device} {precision}"
                          + (" [bold red](RANDOM-INIT weights)[/]" if random else ""))
        all_stats = dist.gather(_encode_mine(encoder, store, mine, cfg, dist.rank))
        if errors := [s["error"] for s in all_stats if "error" in s]:
            raise UserError(errors[0])
        summary = _summary(all_stats, time.perf_counter() - t_start, cfg, shards_total=len(shards),
                           world=dist.world, device=device, precision=precision,
                           weights=enc["weights"]["kind"])
        if dist.rank == 0:  # the other ranks only wait in the barrier below, whatever happens here
            _record_run(store, cfg, summary, [n for _, n, _, _ in todo], all_stats)
        _raise_if_unreadable(cfg, all_stats)
        return summary
    finally:
        dist.barrier()
        if dist.rank == 0:
            lock.release()
        dist.close()


def _start_encoder(cfg: EncodeConfig, dist):
    """(encoder, device, precision) of this rank; under torchrun it joins the process group."""
    from pipeline.devices import cpu_has_fast_bf16, resolve_device, resolve_precision
    from pipeline.encoder import build_encoder

    device = dist.init(resolve_device(cfg.device))  # under torchrun: this rank's GPU, in the process group
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu" and precision == "bf16" and not cpu_has_fast_bf16() and dist.rank == 0:
        console.print("[yellow]warning: this CPU has no native bf16 (AMX / AVX512-BF16): bf16 runs "
                      "hundreds of times slower than fp32 here; --precision auto picks fp32[/]")
    return build_encoder(cfg.model, cfg.weights, cfg.seed, device, precision), device, precision


def _prepare_on_rank0(cfg: EncodeConfig, dist, lock: StoreLock, enc: dict, precision: str,
                      shards: list) -> None:
    """Rank 0 takes the lock and prepares the store; its error reaches every rank, so all stop
    with the same line (on error the lock is released here, else at the end of run)."""
    err = None
    if dist.rank == 0:
        try:
            lock.acquire()
            err = prepare_store(cfg, enc, precision, shards)
        except UserError as e:
            err = str(e)
    err = dist.broadcast(err)
    if err:
        if dist.rank == 0:
            lock.release()
        raise UserError(err)


def _encode_mine(encoder, store: FeatureStore, mine: list, cfg: EncodeConfig, rank: int) -> dict:
    """This rank's shards [(position, name, tar, stats)] encoded; rank 0 shows a progress bar.

    A store write error becomes {"error": line}, so every rank still reaches the gather that
    follows: none waits for one that left.
    """
    total = sum(int(st.get("successes", 0)) for *_, st in mine)
    # the expected sample count lets the reader tell a tar cut at a member boundary from a whole one
    jobs = [(p, n, tar, int(st["successes"]) if "successes" in st else None)
            for p, n, tar, st in mine]
    t_loop = time.perf_counter()
    try:  # an OSError of the store's writer thread surfaces here too (its future's result)
        if rank == 0 and jobs:
            with make_progress() as progress:
                task = progress.add_task("encode", total=total, unit="img")
                stats = encode_shards(encoder, store, jobs, cfg, progress, task)
        else:
            stats = encode_shards(encoder, store, jobs, cfg)
    except OSError as e:
        stats = {"error": store_write_error(cfg.store, e)}
    stats["loop_s"] = time.perf_counter() - t_loop
    return stats


def _summary(all_stats: list[dict], wall: float, cfg: EncodeConfig, *, shards_total: int,
             world: int, device, precision: str, weights: str) -> dict:
    """The run's summary over all ranks: the store's `last_run` and what run returns.

    The ranks run side by side, so the loop and model times are the slowest rank's.
    """
    loop = max(s["loop_s"] for s in all_stats)
    images = sum(s["images"] for s in all_stats)
    model_s = max(s["model_s"] for s in all_stats)
    return {
        "shards_encoded": sum(s["shards"] for s in all_stats), "shards_total": shards_total,
        "images": images, "skipped": sum(s["skipped"] for s in all_stats),
        "wall_s": round(wall, 3), "loop_s": round(loop, 3),
        "img_per_s": round(images / loop, 3) if images else 0.0,
        "model_img_per_s": round(images / model_s, 3) if model_s else 0.0,
        "world_size": world, "device": str(device), "precision": precision,
        "batch_size": cfg.batch_size, "workers": cfg.workers, "weights": weights,
    }


def _record_run(store: FeatureStore, cfg: EncodeConfig, summary: dict, attempted: list[str],
                all_stats: list[dict]) -> None:
    """Rank 0: the summary and the problems of the attempted shards into the store, then printed."""
    try:
        if summary["images"]:
            store.set_attrs(last_run=summary)
        if attempted:
            _record_problems(store, attempted, all_stats)
        _print_summary(store, summary)
    except OSError as e:
        raise UserError(store_write_error(cfg.store, e)) from None


def _raise_if_unreadable(cfg: EncodeConfig, all_stats: list[dict]) -> None:
    """Unreadable shards fail the run (after the others are encoded), so a script notices them."""
    bad = {k: v for s in all_stats for k, v in s["bad_shards"].items()}
    if bad:
        first = "; ".join(f"{n} ({why})" for n, why in sorted(bad.items())[:3]) \
            + ("; ..." if len(bad) > 3 else "")
        raise UserError(f"{len(bad)} shard(s) could not be read and were skipped: {first}. The "
                        f"others are encoded. Fetch them again (delete their _stats.json in "
                        f"{cfg.shards} and rerun `pipeline fetch`), then rerun `pipeline encode`")


def _record_shard_problems(store: FeatureStore, name: str, skipped: dict) -> None:
    """Just after shard `name` is marked done: its skipped images replace its old entries in `problems`."""
    old = store.attrs.get("problems") or {}
    out = {"unreadable_shards": {k: v for k, v in (old.get("unreadable_shards") or {}).items() if k != name},
           "skipped_images": {k: v for k, v in (old.get("skipped_images") or {}).items() if k != name}}
    if skipped:
        out["skipped_images"] = dict(sorted({**out["skipped_images"], name: skipped}.items()))
    if out != old and (old or any(out.values())):
        store.set_attrs(problems=out)


def _record_problems(store: FeatureStore, attempted: list[str], all_stats: list[dict]) -> None:
    """Store attribute `problems`: {unreadable_shards: {shard: error}, skipped_images: {shard: {key: error}}}.

    Entries of the shards this run attempted are replaced (a shard encoded cleanly now loses its old entry).
    """
    old = store.attrs.get("problems") or {}
    out = {}
    for part, key in (("unreadable_shards", "bad_shards"), ("skipped_images", "skipped_images")):
        merged = {k: v for k, v in (old.get(part) or {}).items() if k not in attempted}
        for s in all_stats:
            merged.update(s[key])
        out[part] = dict(sorted(merged.items()))
    if out != old and (old or any(out.values())):
        store.set_attrs(problems=out)


def _print_summary(store: FeatureStore, s: dict) -> None:
    st = FeatureStore.open(store.path, require_done=False)
    counts = st.shard_counts()
    random = st.is_random_init
    if s["shards_encoded"] == 0:
        console.print(f"encode: nothing to do, every shard is encoded ({s['wall_s']:.1f} s)", highlight=False)
    else:
        console.print(
            f"encode: {s['shards_encoded']} shard(s), {s['images']} images in {s['loop_s']:.1f} s "
            f"({s['img_per_s']:.2f} img/s; model alone {s['model_img_per_s']:.2f} img/s; {s['wall_s']:.1f} s with "
            "start-up)" + (f", {s['skipped']} unreadable images skipped" if s["skipped"] else ""))
    console.print(
        f"store: {escape(str(st.path))}  {sum(counts.values())} samples in {sum(1 for v in st.shard_done() if v)}/"
        f"{len(st.shards)} shards, [{st.tokens}, {st.width}] float16, {st.size_bytes() / 2**20:.1f} MiB"
        + ("  [bold red]RANDOM-INIT encoder[/]" if random else ""))
