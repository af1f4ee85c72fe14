"""A training run's folder: config.json (what was trained on what), the checks a new or resumed run
must pass, and the trainer's writes (RunFolder). Reading a trained run back is
pipeline/trained_run.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pipeline import checkpoint, ownership, records
from pipeline.config import RECIPE_ALIASES, DecoderConfig, TrainConfig, to_jsonable
from pipeline.errors import UserError
from pipeline.trained_run import tokenizer_record, upgrade

# Fields that may change between a run and its `--resume`: they do not change what is learned from
# what (or only how fast / how long). Everything else must match, or the resumed run would be
# another run.
RESUMABLE_CHANGES = {"resume", "max_steps", "epochs", "device", "precision", "compile", "cross_attention",
                     "checkpoint_every", "keep_checkpoints", "log_every", "features",
                     "stream_buffer_slabs",
                     "store", "run"}  # a moved folder is the same run




def data_digest(keys: list[str]) -> str:
    """Fingerprint of the sample set in row order: a resumed run must see the same data."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def check_train_config(cfg: TrainConfig, world: int) -> None:
    """Refuse training settings that cannot train, with one line each (`world`: the number of
    processes)."""
    # Each option's own range is checked when the config is built (pipeline/config.py knobs); what
    # is left here spans two options or the process count.
    bad = [
        (cfg.batch_size < world, f"--batch-size {cfg.batch_size} is smaller than the {world} processes"),
        (cfg.parallel_len is not None and not cfg.parallel_len <= cfg.max_len,
         f"--parallel-len must be in 1..--max-len {cfg.max_len} (got {cfg.parallel_len})"),
        (cfg.width % max(cfg.heads, 1) != 0, f"--width {cfg.width} is not divisible by --heads {cfg.heads}"),
    ]
    for failed, msg in bad:
        if failed:
            raise UserError(msg)


def run_record(cfg: TrainConfig, dec_cfg: DecoderConfig, tok, store, index, split) -> dict:
    """config.json: the recipe, the decoder, the tokenizer, the store (encoder and data digest) and
    the split."""
    return {
        "train": to_jsonable(cfg),
        "decoder": dataclasses.asdict(dec_cfg),
        "tokenizer": tokenizer_record(tok),
        "store": {"path": str(cfg.store), "encoder": store.encoder, "tokens": store.tokens, "width": store.width,
                  "samples": len(index), "data_digest": data_digest(index.keys)},
        "encoder_random_init": bool(store.is_random_init),
        "split": {"val_fraction": cfg.val_fraction, "train": int(len(split[0])), "val": int(len(split[1]))},
    }


def check_resume(old: dict, new: dict) -> None:
    """A resumed run must be the same run: the same encoded data, recipe, decoder and tokenizer.

    The data is checked first: settings derived from it (parallel_len) differ only because it
    does."""
    o, n = old.get("store", {}), new["store"]
    if o.get("encoder") != n["encoder"]:
        raise UserError("--resume: the store was encoded with another encoder or weights than this run's; use a new --run")
    if o.get("data_digest") != n["data_digest"]:
        raise UserError(f"--resume: the store's samples changed since this run started ({o.get('samples')} -> "
                        f"{n['samples']}); use a new --run")
    was, now = (upgrade(r, "train") for r in (old, new))
    for rec in (was, now):  # a run started as `--recipe seed` resumes as `--recipe original`
        rec["recipe"] = RECIPE_ALIASES.get(rec.get("recipe"), rec.get("recipe"))
    diffs = [k for k in sorted(set(was) | set(now)) if k not in RESUMABLE_CHANGES and was.get(k) != now.get(k)]
    if diffs:
        k = diffs[0]
        raise UserError(f"--resume: this run was started with {k}={was.get(k)!r}, now {now.get(k)!r}; "
                        "use the same settings or a new --run")
    for part, what in (("decoder", "decoder config"), ("tokenizer", "tokenizer")):
        was, now = (upgrade(r, part) if part == "decoder" else r.get(part) for r in (old, new))
        if was != now:
            raise UserError(f"--resume: the {what} differs from the run's ({was} vs {now}); use a "
                            "new --run")


def made_by_train(folder: Path) -> bool:
    """Whether `folder` is a run this tool trained before run folders carried the ownership marker:
    its config.json is our record (train, decoder, tokenizer and store sections)."""
    try:
        records.read_config(folder)
    except UserError:
        return False
    return (folder / "checkpoints").is_dir()


def check_run_folder(path: Path) -> None:
    """Refuse (one line) a run folder this tool did not make, before anything is written."""
    ownership.check(Path(path), "run", "run folder", legacy=made_by_train)


class RunFolder:
    """A training run's folder as the trainer writes it: config.json, metrics.jsonl, checkpoints/,
    the best epoch's weights, loss.png and summary.json. Rank 0 writes; every rank learns whether a
    write worked (`Dist.on_main`), and a failed write is one line saying the last checkpoint is
    intact."""

    def __init__(self, path: Path, dist):
        from pipeline.runlog import MetricsLog

        self.path, self.dist = Path(path), dist
        self.checkpoints = self.path / "checkpoints"
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self.keep = TrainConfig.keep_checkpoints  # checkpoints kept: the recipe's, set by start()

    def previous(self, resume: bool, record: dict) -> tuple[Path | None, dict | None]:
        """The checkpoint to continue from and the run's config.json (None, None for a new run); a
        run that exists without --resume, or one that differs from `record`, is refused."""
        last = checkpoint.last(self.checkpoints)
        if last is None:
            return None, None
        if not resume:
            raise UserError(f"{self.path} already holds a run (checkpoint {last.name}): pass "
                            "--resume to continue it, or choose another --run")
        try:
            old = records.read_config(self.path)
        except UserError as e:
            raise UserError(f"--resume: {e}") from None
        check_resume(old, record)
        return last, old

    def start(self, record: dict, fresh: bool) -> None:
        """Write config.json (and, for a new run, an empty metrics.jsonl); the checkpoints kept
        from now on are the ones its recipe asks for (`keep_checkpoints`)."""
        self.keep = record["train"].get("keep_checkpoints", self.keep)
        self.dist.on_main(self._start, record, fresh)

    def _start(self, record: dict, fresh: bool) -> None:
        ownership.claim(self.path, "run", "pipeline train", "run folder", legacy=made_by_train)
        try:
            text = json.dumps(record, indent=2, sort_keys=True)
            checkpoint.atomic_write_text(self.path / "config.json", text)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {self.path}: {e.strerror or e}") \
                from None
        if fresh:
            self.metrics.reset(None)

    def log(self, entry: dict) -> None:
        self.dist.on_main(self.metrics.append, entry)

    def cut_log(self, step: int) -> None:
        """On resume: drop entries after the checkpoint's step (and any written at an interrupting
        stop)."""
        self.dist.on_main(self.metrics.reset, step)

    def save(self, state, position, tally) -> None:
        """A checkpoint of the train state at `position`, with the loss sums not yet logged."""
        self.dist.on_main(self._save, state, position, tally)

    def _save(self, state, position, tally) -> None:
        from pipeline.runlog import WRITE_HINT

        extra = {"acc": tally.state()}
        if state.scaler.is_enabled():
            extra["scaler"] = state.scaler.state_dict()
        try:
            checkpoint.save(self.checkpoints, model=state.decoder, optimizer=state.optimizer,
                            scheduler=state.scheduler, step=position.step, epoch=position.epoch,
                            batch=position.batch_idx, extra=extra, keep=self.keep)
        except UserError as e:
            raise UserError(f"{e}: {WRITE_HINT}") from None

    def load(self, path: Path, state, device) -> dict:
        """Restore checkpoint `path` into the train state; -> the checkpoint's state dict."""
        saved = checkpoint.load(path, model=state.decoder, optimizer=state.optimizer,
                                scheduler=state.scheduler, device=device)
        if "scaler" in saved["extra"]:
            state.scaler.load_state_dict(saved["extra"]["scaler"])
        return saved

    def keep_best(self, decoder, info: dict | None) -> None:
        """best.safetensors + best.json for this epoch (info None: rank 0 found no improvement,
        nothing is written; every rank still calls this, so every rank takes part in the
        agreement)."""
        self.dist.on_main(self._keep_best, decoder, info)

    def _keep_best(self, decoder, info: dict | None) -> None:
        from pipeline.early_stop import BEST_WEIGHTS, save_best
        from pipeline.runlog import WRITE_HINT

        if info is None:
            return
        try:
            save_best(self.path, decoder, info)
        except OSError as e:
            raise UserError(f"cannot write {self.path}/{BEST_WEIGHTS}: {e.strerror or e}; the last "
                            f"checkpoint is intact: {WRITE_HINT}") from None

    def plot(self) -> None:
        self.dist.on_main(self._plot)

    def _plot(self) -> None:
        from pipeline.runlog import WRITE_HINT, plot_loss

        try:
            plot_loss(self.metrics.read(), self.path / "loss.png",
                      title=f"{self.path.name}: loss by mode")
        except OSError as e:
            raise UserError(f"cannot write {self.path}/loss.png: {e.strerror or e}; the last "
                            f"checkpoint is intact: {WRITE_HINT}") from None

    def write_summary(self, summary: dict, trained: bool) -> None:
        """summary.json. A rerun with nothing to do keeps the summary of the run that trained (as
        fetch and encode keep their records), so `pipeline bench`'s end-to-end figure still reads
        the real training time."""
        self.dist.on_main(self._write_summary, summary, trained)

    def _write_summary(self, summary: dict, trained: bool) -> None:
        path = self.path / "summary.json"
        try:
            if trained or not path.exists():
                checkpoint.atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True))
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e} (training itself finished and "
                            "is checkpointed)") from None
