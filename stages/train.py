"""Train stage: the CapPa dual-mode caption decoder on cached features, resumable, on one process or DDP."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from pipeline.config import DecoderConfig, TrainConfig
from pipeline.dist import Dist, StopRequest
from pipeline.errors import Interrupted, UserError
from pipeline.progress import console
from pipeline.run import RunFolder, check_train_config, run_record
from pipeline.training import (Clock, LossTally, NonFiniteStep, Position, TrainState, nonfinite_error, train_step,
                               validate)


def run(cfg: TrainConfig) -> dict:
    """Train the decoder on the store's training split; returns (and writes, on rank 0) the run's summary."""
    from pipeline.devices import resolve_device
    from pipeline.lock import FolderLock

    dist = Dist()
    check_train_config(cfg, dist.world)
    device = dist.init(resolve_device(cfg.device))
    try:
        # `<run>.lock`, held by rank 0: a second `pipeline train` into the same folder refuses.
        lock = FolderLock(Path(cfg.run), who="training", noun="the run folder")
        dist.on_main(lock.acquire, failure=f"rank 0 could not lock the run folder {cfg.run}")
        try:
            return train(cfg, dist, device)
        finally:
            lock.release()
    finally:
        dist.close()


# --- data ----------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The store's samples as this run sees them: split, tokenised, and the decoder they define."""

    cfg: TrainConfig  # parallel_len resolved from the training captions
    store: object  # FeatureStore
    index: object  # StoreIndex: keys, captions, rows
    tokenizer: object
    tokens: object  # CaptionTokens of every caption
    train_pos: object  # np.ndarray of index positions
    val_pos: object
    decoder: DecoderConfig
    record: dict  # config.json (before the data order is added)
    tokenize_s: float


def prepare_data(cfg: TrainConfig, dist: Dist) -> Data:
    """Open the store, split it by key, tokenise every caption once, and fix the decoder's shape."""
    from pipeline.loader import CaptionTokens, split_positions
    from pipeline.store import FeatureStore
    from pipeline.tokenizer import load_tokenizer

    store = FeatureStore.open(cfg.store)  # one line if missing, not a store, or nothing encoded yet
    if store.tokens < 1 or store.width < 1:
        raise UserError(f"feature store {cfg.store} has nonsense shape: {store.tokens} tokens x {store.width} wide")
    index = store.index()
    train_pos, val_pos = split_positions(index.keys, cfg.val_fraction)
    if len(train_pos) < dist.world:
        raise UserError(f"feature store {cfg.store} has {len(train_pos)} training samples: too few to train")
    tok = load_tokenizer(cfg.tokenizer)
    t = time.perf_counter()
    tokens = CaptionTokens(tok, index.captions, cfg.max_len)
    t = time.perf_counter() - t
    if cfg.parallel_len is None:  # parallel rows' fixed length: the longest training caption, EOS included;
        # recorded resolved, so a resumed run (same data) keeps it and another length is refused
        cfg = replace(cfg, parallel_len=int(tokens.count[torch.from_numpy(train_pos)].max()))
    dec = DecoderConfig(layers=cfg.layers, width=cfg.width, heads=cfg.heads, mlp_dim=cfg.mlp_dim,
                        vocab_size=tok.vocab_size, max_len=cfg.max_len, encoder_width=store.width,
                        mask_id=tok.mask_id, bos_id=tok.bos_id, eos_id=tok.eos_id, parallel_len=cfg.parallel_len,
                        tie_embeddings=cfg.tie_embeddings, image_positions=store.tokens if cfg.image_pos_emb else None)
    record = run_record(cfg, dec, tok, store, index, (train_pos, val_pos))
    return Data(cfg, store, index, tok, tokens, train_pos, val_pos, dec, record, t)


def make_loaders(data: Data, order: dict, dist: Dist, device):
    """The features (held in memory or streamed, with a progress bar while loading) and the two loaders."""
    from pipeline.loader import FeatureSource, Loader
    from pipeline.progress import make_progress

    cfg = data.cfg
    t = time.perf_counter()
    with make_progress() if dist.main else nullcontext() as bar:
        task = bar.add_task("loading features", total=len(data.index), unit="rows") if bar is not None else None
        source = FeatureSource(data.store, data.index.rows, device=device, mode=order["mode"],
                               slab_rows=order["slab_rows"], progress=None if bar is None else partial(bar.advance, task))
        if bar is not None and source.held is None:
            bar.update(task, visible=False)  # streamed: nothing was loaded up front
    common = dict(seed=cfg.seed, parallel_fraction=cfg.parallel_fraction, mixing=cfg.mixing, rank=dist.rank,
                  world=dist.world, length_buckets=cfg.length_buckets, parallel_len=cfg.parallel_len)
    train_loader = Loader(source, data.tokens, data.train_pos, cfg.batch_size, shuffle=True,
                          buffer_slabs=order["shuffle_group_slabs"], **common)
    val_loader = Loader(source, data.tokens, data.val_pos, cfg.batch_size, shuffle=False,  # groups bound memory
                        buffer_slabs=cfg.stream_buffer_slabs if source.mode == "stream" else None, **common)
    return source, train_loader, val_loader, time.perf_counter() - t


# --- the run -------------------------------------------------------------------------------------------------
def train_precision(cfg: TrainConfig, device) -> str:
    """The precision training runs in (`auto`: bf16 where the hardware is fast at it); TF32 matmuls on CUDA."""
    from pipeline.devices import resolve_precision

    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu" and precision == "fp16":
        raise UserError("--precision fp16 is for CUDA; use bf16 or fp32 on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision


def train(cfg: TrainConfig, dist: Dist, device: torch.device) -> dict:
    """The stage on this rank: data, run folder, model and optimizer, the loop, the summary."""
    from pipeline.early_stop import EarlyStop
    from pipeline.loader import FeatureSource
    from pipeline.model import CaptionDecoder
    from pipeline.ngram import fit_baseline

    t0 = time.perf_counter()
    say = console.print if dist.main else _silent
    precision = train_precision(cfg, device)

    # -- data, and the run folder it is checked against ----------------------------------------------------
    data = prepare_data(cfg, dist)
    cfg, store = data.cfg, data.store
    if store.is_random_init:
        say(f"[bold red]warning:[/] [red]{cfg.store} was encoded with RANDOM-INIT encoder weights (no pretrained "
            "weights were available): captions learned from these features are meaningless. Encode with real "
            "weights (--weights hub or a file) for a useful model.[/]", highlight=False)
    folder = RunFolder(cfg.run, dist)
    previous, old_record = folder.previous(cfg.resume, data.record)
    mode = FeatureSource.resolve_mode(cfg.features, len(data.index) * store.tokens * store.width * 2, device)
    # The data order depends on the shuffle group; it is fixed when the run starts (uniform when the features
    # are held, `stream_buffer_slabs` when streamed) and kept on resume, whichever way features are read then.
    order = (old_record or {}).get("data_order") or {
        "shuffle_group_slabs": cfg.stream_buffer_slabs if mode == "stream" else None, "slab_rows": store.shard_capacity}
    if previous is not None and order["shuffle_group_slabs"] is None and mode == "stream":
        say("note: this run shuffles its whole split (it started with its features in memory), so streaming "
            "it holds the whole split in memory too", highlight=False)
    elif previous is None and cfg.resume:
        say(f"--resume: no checkpoint in {folder.path} yet, starting from scratch", highlight=False)
    folder.start({**data.record, "data_order": order}, fresh=previous is None)
    # The text-only baseline the decoder must beat: a trigram LM counted on the training captions (~1 s).
    captions = data.index.captions
    baseline = fit_baseline(data.tokenizer, [captions[i] for i in data.train_pos],
                            [captions[i] for i in data.val_pos], cfg.max_len) if dist.main and len(data.val_pos) else None
    source, train_loader, val_loader, load_s = make_loaders(data, {**order, "mode": mode}, dist, device)
    total = cfg.epochs * len(train_loader)
    stop_at = min(total, cfg.max_steps or total)

    # -- model and optimizer: the same seed on every rank, so every rank starts from the same weights --------
    torch.manual_seed(cfg.seed)
    state = TrainState.create(CaptionDecoder(data.decoder).to(device), cfg, total, precision, dist, device)
    position, tally = Position(), LossTally(device)
    if previous is not None:
        saved = folder.load(previous, state, device)
        position = Position(saved["step"], saved["epoch"], saved["batch"])
        tally = LossTally(device, saved["extra"]["acc"])
        if position.step < stop_at:  # entries after the checkpoint (or at an interrupting stop) are redone
            folder.cut_log(position.step)
        say(f"resuming {folder.path} at step {position.step} (epoch {position.epoch + 1}, batch "
            f"{position.batch_idx})", highlight=False)

    # -- the loop ------------------------------------------------------------------------------------------
    say(f"train: {len(data.train_pos)} train / {len(data.val_pos)} val samples, {len(train_loader)} steps/epoch x "
        f"{cfg.epochs} epochs, features {source.mode} ({source.nbytes / 2**30:.2f} GiB), {device.type} {precision}, "
        f"{dist.world} process{'es' if dist.world > 1 else ''}", highlight=False)
    # Early stopping and the best epoch's weights: state derived from metrics.jsonl (cut back on resume).
    early = EarlyStop(cfg.patience, cfg.parallel_fraction, folder.metrics.read() if dist.main else [])
    loop = Loop(cfg, state, folder, train_loader, val_loader, early, position, tally, stop_at, data.index.keys)
    loop.run()

    # -- summary -------------------------------------------------------------------------------------------
    summary = {
        "steps": position.step, "total_steps": total, "complete": position.step >= total or loop.stopped_early,
        "steps_this_run": position.step - loop.start_step, "early_stopping": early.record(),
        "ngram_baseline": baseline, "stage_wall_s": time.perf_counter() - t0, **loop.clock.summary(),
        "tokenize_s": data.tokenize_s, "features_load_s": load_s, "features": source.mode, "device": str(device),
        "precision": precision, "world_size": dist.world, "batch_size": cfg.batch_size,
        "last_train": loop.last_train, "last_val": loop.last_val, "encoder_random_init": bool(store.is_random_init),
        "interrupted": loop.interrupted,
    }
    folder.write_summary(summary, trained=loop.clock.samples > 0)
    if dist.main:
        print_summary(summary, early, baseline, folder, store.is_random_init)
    if loop.interrupted:
        raise Interrupted(f"training interrupted at step {position.step}/{total}; checkpoint saved in "
                          f"{folder.checkpoints}: rerun with --resume to continue from it")
    return summary


class Loop:
    """The training loop and its state: steps until `stop_at`, an interruption or early stopping, with a log
    entry every `log_every` steps, validation and the best weights at each epoch end, and checkpoints."""

    def __init__(self, cfg, state, folder, train_loader, val_loader, early, position, tally, stop_at, keys):
        self.cfg, self.state, self.dist, self.folder = cfg, state, state.dist, folder
        self.train_loader, self.val_loader, self.early, self.keys = train_loader, val_loader, early, keys
        self.position, self.tally, self.stop_at, self.start_step = position, tally, stop_at, position.step
        self.clock = Clock()
        self.last_train = self.last_val = self.last_step = None
        self.interrupted = False
        self.stopped_early = not self.dist.all_ok(not early.exhausted)  # a rerun of a run that stopped early
        self.progress = None

    def run(self) -> None:
        from pipeline.progress import make_progress
        from rich.progress import TextColumn

        pos, cfg, steps_per_epoch = self.position, self.cfg, len(self.train_loader)
        self.progress = make_progress(TextColumn("loss {task.fields[loss]}")) if self.dist.main else None
        stop_request = StopRequest(self.progress.console.print if self.progress is not None else _silent)
        with self.progress if self.progress is not None else nullcontext(), stop_request:
            task = self.progress.add_task("train", total=self.samples_left(), unit="samples", loss="--") \
                if self.progress is not None else None
            while pos.step < self.stop_at and not self.interrupted and not self.stopped_early:
                batches = self.train_loader.epoch(pos.epoch, pos.batch_idx)
                try:
                    for batch in batches:
                        self.step(batch)
                        if pos.step % cfg.log_every == 0:
                            self.log_train()
                        self.show(task, batch.size)
                        with self.clock.aside():
                            end_of_epoch = pos.batch_idx == steps_per_epoch
                            if end_of_epoch:
                                self.end_epoch()
                            self.interrupted = (pos.step < self.stop_at and not self.stopped_early
                                                and stop_request.agreed(self.dist))
                            done = pos.step >= self.stop_at or self.interrupted or self.stopped_early
                            if end_of_epoch or done or pos.step % cfg.checkpoint_every == 0:
                                self.folder.save(self.state, pos, self.tally)
                            if end_of_epoch:
                                self.folder.plot()
                        if done:
                            break
                finally:
                    batches.close()
        self.clock.stop()
        if pos.step > self.start_step:  # the last partial interval, and a mid-epoch stop's validation
            self.log_train(stop=True)
            if pos.batch_idx != 0 and not self.interrupted and not self.stopped_early:
                self.validate(stop=True)
            self.folder.plot()

    def step(self, batch) -> None:
        try:
            self.last_step = train_step(self.state, batch)
        except NonFiniteStep:
            self.folder.save(self.state, self.position, self.tally)  # the state before the bad step
            raise nonfinite_error(batch, self.keys, self.position.step) from None
        self.tally.add(self.last_step.sums)
        self.position.step, self.position.batch_idx = self.position.step + 1, self.position.batch_idx + 1
        self.clock.count(batch.size)

    def log_train(self, stop: bool = False) -> None:
        """One train entry from the loss sums since the last (stop=True: written at an interruption, dropped on
        resume)."""
        means = self.tally.read(self.dist)
        if means is None:
            return
        self.tally.zero_()
        pos, last = self.position, self.last_step
        entry = {"kind": "train", "step": pos.step, "epoch": pos.epoch_of_last_step, "samples": self.samples_seen(),
                 **means, "lr": last.lr if last else self.cfg.lr,
                 "grad_norm": float(last.grad_norm) if last else 0.0, "samples_per_s": self.clock.interval_rate()}
        if stop:
            entry["stop"] = True
        self.folder.log(entry)
        self.last_train = entry

    def validate(self, stop: bool = False) -> dict | None:
        if len(self.val_loader) == 0:
            return None
        val = validate(self.state.decoder, self.val_loader, self.state.precision, self.dist)
        entry = {"kind": "val", "step": self.position.step, "epoch": self.position.epoch_of_last_step, **val}
        if stop:
            entry["stop"] = True
        self.folder.log(entry)
        self.last_val = entry
        return entry

    def end_epoch(self) -> None:
        """Validate, keep the best weights (before the checkpoint: a crash between them redoes both), decide on
        early stopping, and move on to the next epoch."""
        pos = self.position
        val = self.validate()
        if val is not None and self.progress is not None:
            self.progress.console.print(f"epoch {pos.epoch + 1}/{self.cfg.epochs} (step {pos.step}): val loss ar "
                                        f"{_f(val['loss_ar'])} par {_f(val['loss_par'])}", highlight=False)
        improved = val is not None and self.early.update(val)  # rank 0's answer is the one that counts:
        best = {"step": pos.step, "epoch": pos.epoch + 1, **{k: (val or {}).get(k) for k in ("loss_ar", "loss_par")},
                **self.early.record()}  # every rank calls keep_best, so all take part in its agreement
        self.folder.keep_best(self.state.decoder, best if improved else None)
        self.stopped_early = not self.dist.all_ok(not self.early.exhausted)
        pos.epoch, pos.batch_idx = pos.epoch + 1, 0

    def show(self, task, samples: int) -> None:
        if self.progress is not None:
            fields = {"loss": f"{self.last_train['loss']:.3f}"} if self.last_train else {}
            self.progress.update(task, advance=samples, **fields)

    def samples_seen(self) -> int:  # at the position training continues from
        n = len(self.train_loader.positions)
        return self.position.epoch * n + min(self.position.batch_idx * self.cfg.batch_size, n)

    def samples_left(self) -> int:
        n, per_epoch, bs = len(self.train_loader.positions), len(self.train_loader), self.cfg.batch_size
        return sum(min(bs, n - (s % per_epoch) * bs) for s in range(self.position.step, self.stop_at))


def print_summary(summary: dict, early, baseline, folder: RunFolder, random_init: bool) -> None:
    from pipeline.ngram import warning as ngram_warning

    say, step, total = console.print, summary["steps"], summary["total_steps"]
    if summary["samples_this_run"]:
        lt, lv = summary["last_train"] or {}, summary["last_val"] or {}
        say(f"trained to step {step}/{total} in {summary['train_wall_s']:.1f} s ({summary['samples_per_s']:.1f} "
            f"samples/s); train loss ar {_f(lt.get('loss_ar'))} par {_f(lt.get('loss_par'))}; val ar "
            f"{_f(lv.get('loss_ar'))} par {_f(lv.get('loss_par'))} -> {folder.path}", highlight=False)
    else:
        say(f"{folder.path} is already trained to step {step}/{total}: nothing to do", highlight=False)
    if random_init:
        say("[bold red]warning:[/] [red]trained on features from a RANDOM-INIT encoder[/]", highlight=False)
    beaten = ngram_warning(early.best_entry.get("loss_ar"), baseline)
    if beaten:
        say(f"[bold red]warning:[/] [red]{beaten} (train longer or with a higher learning rate)[/]", highlight=False)


def _silent(*args, **kwargs) -> None:  # what ranks other than 0 print
    pass


def _f(x) -> str:
    return "--" if x is None else f"{x:.3f}"
