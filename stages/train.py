"""Train stage: the CapPa dual-mode caption decoder on cached features, resumable, on one process or
DDP."""

from __future__ import annotations

import resource
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from rich.progress import TextColumn

from pipeline import token_cache
from pipeline.config import DecoderConfig, TrainConfig, decoder_config
from pipeline.devices import resolve_device, resolve_precision
from pipeline.dist import Dist, StopRequest
from pipeline.early_stop import EarlyStop
from pipeline.errors import Interrupted, UserError
from pipeline.loader import Batch, CaptionTokens, FeatureSource, Loader, split_positions
from pipeline.memory import give_back
from pipeline.lock import FolderLock
from pipeline.model import CaptionDecoder
from pipeline.ngram import fit_baseline
from pipeline.ngram import warning as ngram_warning
from pipeline.objective import RowMix
from pipeline.progress import console, make_progress
from pipeline.run import RunFolder, check_run_folder, check_train_config, run_record
from pipeline.store import FeatureStore, StoreIndex
from pipeline.tokenizer import Tokenizer, load_tokenizer
from pipeline.training import (Clock, LossTally, NonFiniteStep, Position, StepResult, TrainState,
                               nonfinite_error, train_step, validate)


def run(cfg: TrainConfig) -> dict:
    """Train the decoder on the store's training split; returns (and writes, on rank 0) the run's
    summary."""
    dist = Dist()
    check_train_config(cfg, dist.world)
    device = dist.init(resolve_device(cfg.device))
    try:
        # `<run>.lock`, held by rank 0: a second `pipeline train` into the same folder refuses.
        lock = FolderLock(Path(cfg.run), who="training", noun="the run folder")
        dist.on_main(lock.acquire, failure=f"rank 0 could not lock the run folder {cfg.run}")
        # Never into a folder of someone else's files: a user's config.json or best.safetensors
        # would be overwritten.
        dist.on_main(check_run_folder, cfg.run, failure=f"rank 0 could not check the run folder {cfg.run}")
        try:
            return train(cfg, dist, device)
        finally:
            lock.release()
    finally:
        dist.close()


# --- the loop -------------------------------------------------------------------------------------
def train(cfg: TrainConfig, dist: Dist, device: torch.device) -> dict:
    """The stage on this rank: set up (data, run folder, model, resume), the loop, the summary."""
    t0 = time.perf_counter()
    r = setup(cfg, dist, device)
    pos, cfg = r.position, r.cfg
    bar = make_progress(TextColumn("loss {task.fields[loss]}")) if dist.main else None
    say = bar.console.print if bar is not None else _silent
    with bar if bar is not None else nullcontext(), StopRequest(say) as stop_request, \
            closing(batches_from(r.train_loader, pos)) as batches:
        task = bar.add_task("train", total=r.samples_left(), unit="samples", loss="--") \
            if bar is not None else None
        batch: Optional[Batch] = None  # the last step's
        r.clock = Clock()
        while True:
            # -- once in a while, after a step: log, epoch end, stop request, checkpoint -----------
            if batch is not None:
                if pos.step % cfg.log_every == 0:
                    r.log_train()
                if bar is not None:
                    fields = {"loss": f"{r.last_train['loss']:.3f}"} if r.last_train else {}
                    bar.update(task, advance=batch.size, **fields)
                with r.clock.aside():
                    end_of_epoch = pos.batch_idx == len(r.train_loader)
                    if end_of_epoch:  # validate, keep the best weights, decide on early stopping
                        r.end_epoch(say)
                    r.interrupted = (pos.step < r.stop_at and not r.stopped_early
                                     and stop_request.agreed(dist))
                    done = pos.step >= r.stop_at or r.interrupted or r.stopped_early
                    if end_of_epoch or done or pos.step % cfg.checkpoint_every == 0:
                        r.folder.save(r.state, pos, r.tally)
                        give_back()  # validation's and the checkpoint's blocks: not the step's
                    if end_of_epoch:
                        r.folder.plot()
                if done:
                    break
            elif pos.step >= r.stop_at or r.stopped_early:  # nothing to train
                break
            # -- the training step ----------------------------------------------------------------
            batch = next(batches)
            try:
                r.last_step = train_step(r.state, batch)
            except NonFiniteStep:
                r.folder.save(r.state, pos, r.tally)  # the state before the bad step
                raise nonfinite_error(batch, r.data.index.keys, pos.step) from None
            r.tally.add(r.last_step.sums)
            pos.step, pos.batch_idx = pos.step + 1, pos.batch_idx + 1
            r.clock.count(batch.size)
    r.clock.stop()
    if pos.step > r.start_step:  # the last partial interval, and a mid-epoch stop's validation
        r.log_train(stop=True)
        if pos.batch_idx != 0 and not r.interrupted and not r.stopped_early:
            r.validate(stop=True)
        r.folder.plot()
    return finish(r, time.perf_counter() - t0)


def batches_from(loader: Loader, pos: Position) -> Iterator[Batch]:
    """Training batches from `pos` on, epoch after epoch; `pos` names the next epoch once one ends
    (each epoch's prefetching thread is stopped when it is left)."""
    while True:
        epoch = loader.epoch(pos.epoch, pos.batch_idx)
        try:
            yield from epoch
        finally:
            epoch.close()


@dataclass
class TrainRun:
    """Everything the loop reads and writes: the run's data, model state and position, and what it
    logged."""

    cfg: TrainConfig
    data: Data
    folder: RunFolder
    state: TrainState
    train_loader: Loader
    val_loader: Loader
    early: EarlyStop
    position: Position
    tally: LossTally
    stop_at: int  # optimizer steps to reach in this run
    total: int  # optimizer steps of the whole recipe
    extras: dict  # summary fields fixed at setup (features, precision, baseline, load times)
    baseline: Optional[dict] = None  # the n-gram baseline's losses (rank 0)
    start_step: int = 0
    clock: Clock = field(default_factory=Clock)
    last_step: Optional[StepResult] = None
    last_train: Optional[dict] = None
    last_val: Optional[dict] = None
    interrupted: bool = False
    stopped_early: bool = False

    def log_train(self, stop: bool = False) -> None:
        """One train entry from the loss sums since the last (stop=True: written at an interruption,
        dropped on resume)."""
        means = self.tally.read(self.state.dist)
        if means is None:
            return
        self.tally.zero_()
        pos, last = self.position, self.last_step
        entry = {"kind": "train", "step": pos.step, "epoch": pos.epoch_of_last_step,
                 "samples": self.samples_seen(), **means, "lr": last.lr if last else self.cfg.lr,
                 "grad_norm": float(last.grad_norm) if last else 0.0,
                 "samples_per_s": self.clock.interval_rate()}
        if stop:
            entry["stop"] = True
        self.folder.log(entry)
        self.last_train = entry

    def validate(self, stop: bool = False) -> Optional[dict]:
        if len(self.val_loader) == 0:
            return None
        val = validate(self.state.decoder, self.val_loader, self.state.precision, self.state.dist)
        pos = self.position
        entry = {"kind": "val", "step": pos.step, "epoch": pos.epoch_of_last_step, **val}
        if stop:
            entry["stop"] = True
        self.folder.log(entry)
        self.last_val = entry
        return entry

    def end_epoch(self, say) -> None:
        """Validate, keep the best weights (before the checkpoint: a crash between them redoes
        both), decide on early stopping, and move on to the next epoch."""
        pos = self.position
        val = self.validate()
        if val is not None:
            say(f"epoch {pos.epoch + 1}/{self.cfg.epochs} (step {pos.step}): val loss ar "
                f"{_f(val['loss_ar'])} par {_f(val['loss_par'])}", highlight=False)
        # Rank 0's answer is the one that counts: every rank calls keep_best, so all take part in
        # its agreement.
        improved = val is not None and self.early.update(val)
        best = {"step": pos.step, "epoch": pos.epoch + 1,
                **{k: (val or {}).get(k) for k in ("loss_ar", "loss_par")}, **self.early.record()}
        self.folder.keep_best(self.state.decoder, best if improved else None)
        self.stopped_early = not self.state.dist.all_ok(not self.early.exhausted)
        pos.epoch, pos.batch_idx = pos.epoch + 1, 0

    def samples_seen(self) -> int:  # at the position training continues from
        n = len(self.train_loader.positions)
        return self.position.epoch * n + min(self.position.batch_idx * self.cfg.batch_size, n)

    def samples_left(self) -> int:
        n, per_epoch = len(self.train_loader.positions), len(self.train_loader)
        bs = self.cfg.batch_size
        steps = range(self.position.step, self.stop_at)
        return sum(min(bs, n - (s % per_epoch) * bs) for s in steps)


# --- before the loop ------------------------------------------------------------------------------
@dataclass
class Data:
    """The store's samples as this run sees them: split, tokenised, and the decoder they define."""

    cfg: TrainConfig  # parallel_len resolved from the training captions
    store: FeatureStore
    index: StoreIndex  # keys, captions, rows
    tokenizer: Tokenizer
    tokens: CaptionTokens  # every caption, tokenised
    train_pos: np.ndarray  # index positions
    val_pos: np.ndarray
    decoder: DecoderConfig
    record: dict  # config.json (before the data order is added)
    tokenize_s: float
    token_cache: str  # "hit" | "extended" | "built" | "unwritable" | "not cached" (token_cache.py)


@dataclass
class DataOrder:
    """What fixes the data order, decided when a run starts and kept on resume (config.json's
    `data_order`): the shuffle group in slabs (None: the whole split, as when the features are held
    in memory) and the slab's rows."""

    shuffle_group_slabs: Optional[int]
    slab_rows: int

    def record(self) -> dict:
        return {"shuffle_group_slabs": self.shuffle_group_slabs, "slab_rows": self.slab_rows}


def setup(cfg: TrainConfig, dist: Dist, device: torch.device) -> TrainRun:
    """Data, run folder, loaders, model and optimizer (resumed from the last checkpoint with
    --resume)."""
    say = console.print if dist.main else _silent
    precision = train_precision(cfg, device)
    data = prepare_data(cfg, dist)
    cfg, store = data.cfg, data.store
    if store.is_random_init:
        say(f"[bold red]warning:[/] [red]{cfg.store} was encoded with RANDOM-INIT encoder weights "
            "(no pretrained weights were available): captions learned from these features are "
            "meaningless. Encode with real weights (--weights hub or a file) for a useful "
            "model.[/]", highlight=False)
    folder = RunFolder(cfg.run, dist)
    previous, order, placement = start_folder(folder, data, device, say)
    # The text-only baseline the decoder must beat: a trigram LM counted on the training captions
    # (~1 s).
    baseline = None
    if dist.main and len(data.val_pos):
        baseline = fit_baseline(data.tokenizer, data.tokens.id_lists(data.train_pos),
                                data.tokens.id_lists(data.val_pos), cfg.max_len)
    source, train_loader, val_loader, load_s = make_loaders(data, order, placement, dist, device)
    total = cfg.epochs * len(train_loader)
    # The same seed on every rank, so every rank starts from the same weights.
    torch.manual_seed(cfg.seed)
    decoder = CaptionDecoder(data.decoder).to(device)
    state = TrainState.create(decoder, cfg, total, precision, dist, device)
    stop_at = min(total, cfg.max_steps or total)
    position, tally = Position(), LossTally(device)
    if previous is not None:
        position, tally = resume(folder, state, previous, stop_at, device, say)
    say(f"train: {len(data.train_pos)} train / {len(data.val_pos)} val samples, "
        f"{len(train_loader)} steps/epoch x {cfg.epochs} epochs, features {source.placement} "
        f"({source.nbytes / 2**30:.2f} GiB), {device.type} {precision}, "
        f"{dist.world} process{'es' if dist.world > 1 else ''}", highlight=False)
    # Early stopping and the best epoch's weights: state derived from metrics.jsonl (cut back on
    # resume).
    early = EarlyStop(cfg.patience, cfg.parallel_fraction,
                      folder.metrics.read() if dist.main else [])
    extras = {"tokenize_s": data.tokenize_s, "token_cache": data.token_cache,
              "features_load_s": load_s, "features": source.placement, "device": str(device),
              "precision": precision}
    stopped = not dist.all_ok(not early.exhausted)  # a rerun of a run that stopped early
    return TrainRun(cfg, data, folder, state, train_loader, val_loader, early, position, tally,
                    stop_at, total, extras, baseline, start_step=position.step,
                    stopped_early=stopped)


def start_folder(folder: RunFolder, data: Data, device,
                 say) -> tuple[Optional[Path], DataOrder, str]:
    """Check the run folder against this run (resume or new) and write config.json; -> (checkpoint
    to resume from or None, the data order, where the features go: "memory" | "stream")."""
    cfg, store = data.cfg, data.store
    previous, old_record = folder.previous(cfg.resume, data.record)
    nbytes = len(data.index) * store.tokens * store.width * 2
    placement = FeatureSource.resolve_placement(cfg.features, nbytes, device)
    # The data order depends on the shuffle group; it is fixed when the run starts (uniform when the
    # features are held, `stream_buffer_slabs` when streamed) and kept on resume, however features
    # are read.
    old = (old_record or {}).get("data_order")
    order = DataOrder(**old) if old else DataOrder(
        cfg.stream_buffer_slabs if placement == "stream" else None, store.shard_capacity)
    if previous is not None and order.shuffle_group_slabs is None and placement == "stream":
        say("note: this run shuffles its whole split (it started with its features in memory), so "
            "streaming it holds the whole split in memory too", highlight=False)
    elif previous is None and cfg.resume:
        say(f"--resume: no checkpoint in {folder.path} yet, starting from scratch", highlight=False)
    folder.start({**data.record, "data_order": order.record()}, fresh=previous is None)
    return previous, order, placement


def resume(folder: RunFolder, state: TrainState, previous: Path, stop_at: int, device,
           say) -> tuple[Position, LossTally]:
    """Load the checkpoint into the train state and cut the log back to it; -> its position and the
    loss sums it had not logged yet."""
    saved = folder.load(previous, state, device)
    position = Position(saved["step"], saved["epoch"], saved["batch"])
    if position.step < stop_at:  # entries after the checkpoint (or at an interrupting stop): redone
        folder.cut_log(position.step)
    say(f"resuming {folder.path} at step {position.step} (epoch {position.epoch + 1}, batch "
        f"{position.batch_idx})", highlight=False)
    return position, LossTally(device, saved["extra"]["acc"])


def prepare_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Open the store, split it by key, tokenise every caption once, and fix the decoder's shape."""
    store = FeatureStore.open(cfg.store)  # one line if missing, not a store, or nothing encoded yet
    if store.tokens < 1 or store.width < 1:
        raise UserError(f"feature store {cfg.store} has nonsense shape: {store.tokens} tokens x "
                        f"{store.width} wide")
    index = store.index()
    train_pos, val_pos = split_positions(index.keys, cfg.val_fraction)
    if len(train_pos) < dist.world:
        raise UserError(f"feature store {cfg.store} has {len(train_pos)} training samples: too few "
                        "to train")
    tok = load_tokenizer(cfg.tokenizer)
    t = time.perf_counter()
    tokens, cache = caption_tokens(index, tok, cfg.max_len, dist)
    t = time.perf_counter() - t
    # Parallel rows' fixed length: the longest training caption, EOS included; recorded resolved, so
    # a resumed run (same data) keeps it and another length is refused.
    if cfg.parallel_len is None:
        cfg = replace(cfg, parallel_len=int(tokens.count[torch.from_numpy(train_pos)].max()))
    dec = decoder_config(cfg, store.tokens, store.width, tok)
    record = run_record(cfg, dec, tok, store, index, (train_pos, val_pos))
    return Data(cfg, store, index, tok, tokens, train_pos, val_pos, dec, record, t, cache)


def caption_tokens(index: StoreIndex, tok: Tokenizer, max_len: int,
                   dist: Dist) -> tuple[CaptionTokens, str]:
    """Every caption's ids from the store's token cache (pipeline/token_cache.py), which rank 0
    extends or builds when it does not cover the store; the other ranks then read what it wrote
    (or tokenise in memory where it could not write). -> (tokens, how the cache served them)."""
    def note(line: str) -> None:
        console.print(line, highlight=False)

    got = token_cache.caption_token_ids(index, tok, max_len, say=note) if dist.main else None
    dist.barrier()  # rank 0's cache is on disk
    if got is None:
        got = token_cache.lookup(index, tok, max_len) or \
            token_cache.caption_token_ids(index, tok, max_len, say=_silent, write=False)
    return CaptionTokens.of(got.ids, got.lengths), got.cache


def make_loaders(data: Data, order: DataOrder, placement: str, dist: Dist, device):
    """The features (held in memory or streamed, with a progress bar while loading) and the two
    loaders."""
    cfg = data.cfg
    t = time.perf_counter()
    with make_progress() if dist.main else nullcontext() as bar:
        task = bar.add_task("loading features", total=len(data.index), unit="rows") \
            if bar is not None else None
        source = FeatureSource(data.store, data.index.rows, device=device, placement=placement,
                               slab_rows=order.slab_rows,
                               progress=None if bar is None else partial(bar.advance, task))
        if bar is not None and source.held is None:
            bar.update(task, visible=False)  # streamed: nothing was loaded up front
    mix = RowMix(cfg.parallel_fraction, cfg.mixing, cfg.parallel_len)
    common = dict(seed=cfg.seed, mix=mix, rank=dist.rank, world=dist.world,
                  length_buckets=cfg.length_buckets)
    train_loader = Loader(source, data.tokens, data.train_pos, cfg.batch_size, shuffle=True,
                          buffer_slabs=order.shuffle_group_slabs, **common)
    val_groups = cfg.stream_buffer_slabs if source.placement == "stream" else None  # bound memory
    val_loader = Loader(source, data.tokens, data.val_pos, cfg.batch_size, shuffle=False,
                        buffer_slabs=val_groups, **common)
    return source, train_loader, val_loader, time.perf_counter() - t


def train_precision(cfg: TrainConfig, device) -> str:
    """The precision training runs in (`auto`: bf16 where the hardware is fast at it); TF32 matmuls
    on CUDA."""
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu" and precision == "fp16":
        raise UserError("--precision fp16 is for CUDA; use bf16 or fp32 on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision


# --- after the loop -------------------------------------------------------------------------------
def process_usage() -> dict:
    """This process's peak RSS, minor page faults and user / kernel CPU seconds so far: what the
    memory targets and the kernel's share of the stage are read from (machine-independent)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_gb": ru.ru_maxrss * 1024 / 1e9, "minor_faults": ru.ru_minflt,
            "cpu_user_s": ru.ru_utime, "cpu_system_s": ru.ru_stime}


def finish(r: TrainRun, stage_wall_s: float) -> dict:
    """Write summary.json (and print it on rank 0); an interrupted run then exits with its line."""
    pos, dist = r.position, r.state.dist
    summary = {
        "steps": pos.step, "total_steps": r.total,
        "complete": pos.step >= r.total or r.stopped_early,
        "steps_this_run": pos.step - r.start_step, "early_stopping": r.early.record(),
        "ngram_baseline": r.baseline, "stage_wall_s": stage_wall_s, **r.clock.summary(),
        "tokenize_s": r.extras["tokenize_s"], "token_cache": r.extras["token_cache"],
        "features_load_s": r.extras["features_load_s"],
        "features": r.extras["features"], "device": r.extras["device"],
        "precision": r.extras["precision"], "world_size": dist.world,
        "batch_size": r.cfg.batch_size,
        "last_train": r.last_train, "last_val": r.last_val,
        "encoder_random_init": bool(r.data.store.is_random_init), "interrupted": r.interrupted,
        "process": process_usage(),
    }
    r.folder.write_summary(summary, trained=r.clock.samples > 0)
    if dist.main:
        print_summary(summary, r.early, r.baseline, r.folder, r.data.store.is_random_init)
    if r.interrupted:
        raise Interrupted(f"training interrupted at step {pos.step}/{r.total}; checkpoint saved in "
                          f"{r.folder.checkpoints}: rerun with --resume to continue from it")
    return summary


def print_summary(summary: dict, early, baseline, folder: RunFolder, random_init: bool) -> None:
    say, step, total = console.print, summary["steps"], summary["total_steps"]
    if summary["samples_this_run"]:
        lt, lv = summary["last_train"] or {}, summary["last_val"] or {}
        say(f"trained to step {step}/{total} in {summary['train_wall_s']:.1f} s "
            f"({summary['samples_per_s']:.1f} samples/s); train loss ar {_f(lt.get('loss_ar'))} "
            f"par {_f(lt.get('loss_par'))}; val ar {_f(lv.get('loss_ar'))} "
            f"par {_f(lv.get('loss_par'))} -> {folder.path}", highlight=False)
    else:
        say(f"{folder.path} is already trained to step {step}/{total}: nothing to do",
            highlight=False)
    if random_init:
        say("[bold red]warning:[/] [red]trained on features from a RANDOM-INIT encoder[/]",
            highlight=False)
    beaten = ngram_warning(early.best_entry.get("loss_ar"), baseline)
    if beaten:
        say(f"[bold red]warning:[/] [red]{beaten} (train longer or with a higher learning rate)[/]",
            highlight=False)


def _silent(*args, **kwargs) -> None:  # what ranks other than 0 print
    pass


def _f(x) -> str:
    return "--" if x is None else f"{x:.3f}"
