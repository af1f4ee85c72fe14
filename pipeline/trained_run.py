"""A trained run read back for eval and caption: its config.json, its tokenizer (refused if it now
maps text to other ids), its decoder with the chosen weights, its training precision and its feature
store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoint, records
from pipeline.config import DecoderConfig
from pipeline.errors import UserError


# Old runs: what a config.json without a key trained as, per section, and keys since renamed (old
# key -> function of the old value giving the new keys). Applied when a record is read back (resume,
# eval).
ABSENT_MEANS = {
    "train": {"image_pos_emb": False},
    "decoder": {"tie_embeddings": False, "image_pos_emb": False},
}
RENAMED = {
    "decoder": {"image_positions": lambda p: {"image_pos_emb": p is not None, "image_tokens": p}},
}


def upgrade(record: dict, section: str) -> dict:
    """One section of a config.json with its old keys renamed and missing settings filled in."""
    old = dict(record.get(section) or {})
    for key, new in RENAMED.get(section, {}).items():
        if key in old:
            old.update(new(old.pop(key)))
    return {**ABSENT_MEANS.get(section, {}), **old}


def decoder_of(record: dict) -> DecoderConfig:
    """The DecoderConfig a config.json records (old records upgraded)."""
    return DecoderConfig(**upgrade(record, "decoder"))


def tokenizer_record(tok) -> dict:
    """What a run records of its tokenizer (config.json's `tokenizer`): a changed one is refused."""
    return {"name": tok.name, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id}


def read_record(run: Path) -> dict:
    """A run folder's config.json, or one line saying why there is none."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"no run folder {run}: train one first (`pipeline train --run {run}`)")
    if not (run / "config.json").exists():
        raise UserError(f"{run} has no config.json: not a training run (or it never started)")
    return records.read_config(run)  # an object with train/decoder/tokenizer/store, or one line


def check_tokenizer(record: dict):
    """The tokenizer recorded in the run, refusing one that now maps text to other ids."""
    from pipeline.tokenizer import load_tokenizer

    rec = record.get("tokenizer") or {}
    if "name" not in rec:
        raise UserError("the run's config.json records no tokenizer")
    tok = load_tokenizer(rec["name"])
    now = tokenizer_record(tok)
    diff = [k for k in now if k in rec and rec[k] != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"tokenizer {rec['name']!r} now loads with {k}={now[k]}, but the run was "
                        f"trained with {k}={rec[k]}: its ids would not match the decoder")
    return tok


@dataclass
class LoadedRun:
    path: Path
    record: dict  # config.json
    decoder: object  # CaptionDecoder, eval mode, on the device
    tokenizer: object
    ckpt: Path  # the weights' checkpoint folder or safetensors file
    step: int  # the step they were saved at (-1: not recorded)
    # "best" (the best epoch's weights, kept by the trainer) | "last" (the newest checkpoint) |
    # "path" (a checkpoint folder or weights file named by the user)
    chosen: str


# What `--checkpoint` accepts besides a path: the best epoch's weights (else the newest
# checkpoint's), or the newest checkpoint's.
CHOICES = ("best", "last")


def choose_weights(run: Path, which: str = "best") -> tuple[Path, Path, int, str]:
    """-> (safetensors file, what to record: its folder or file, step, chosen) for `which`: best |
    last | PATH (a checkpoint folder, or a .safetensors file such as best.safetensors).

    best: the best epoch's weights when the trainer kept them, else the newest checkpoint's (a run
    with early stopping off keeps no best). A named checkpoint folder is checked against its
    digests and refused when they differ; it never falls back to another."""
    from pipeline.early_stop import BEST_WEIGHTS, best_checkpoint

    run = Path(run)
    if which == "best":
        best = best_checkpoint(run)
        if best is not None:
            return best[0], best[0], int(best[1]["step"]), "best"
    if which in CHOICES:
        ckpt = checkpoint.resolve(run / "checkpoints")  # UserError when there is none
        return ckpt / "model.safetensors", ckpt, _step_of(ckpt), "last"
    path = Path(which)
    if path.is_dir() and (path / "model.safetensors").is_file():
        why = checkpoint.check(path)
        if why:
            raise UserError(f"--checkpoint {path} is corrupt: {why}")
        return path / "model.safetensors", path, _step_of(path), "path"
    if path.is_file() and path.suffix == ".safetensors":
        if path.name == BEST_WEIGHTS and best_checkpoint(path.parent) is None:
            raise UserError(f"--checkpoint {path}: its {path.parent}/best.json is missing or "
                            "names another save")
        return path, path, _header_step(path), "path"
    raise UserError(f"--checkpoint {which}: not best, last, a checkpoint folder (with "
                    "model.safetensors) or a .safetensors file")


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1]) if ckpt.name.startswith("step-") else _header_step(
        ckpt / "model.safetensors")


def _header_step(file: Path) -> int:
    """The step a safetensors header records, or -1."""
    from pipeline.early_stop import _weights_step

    step = _weights_step(file)
    return int(step) if step is not None and step.isdigit() else -1


def load_run(run: Path, device, which: str = "best") -> LoadedRun:
    """Run folder -> its decoder (eval mode) with the weights `which` chooses (`choose_weights`:
    best | last | PATH) and the recorded tokenizer."""
    from pipeline.model import CaptionDecoder

    record = read_record(run)
    tok = check_tokenizer(record)
    try:
        dec_cfg = decoder_of(record)
    except TypeError as e:  # a key this version does not know, or one missing
        raise UserError(f"{run}/config.json: its decoder record does not fit this version ({e})") from None
    if (dec_cfg.vocab_size, dec_cfg.mask_id, dec_cfg.eos_id) != (tok.vocab_size, tok.mask_id, tok.eos_id):
        raise UserError(f"the run's decoder expects {dec_cfg.vocab_size} ids (mask {dec_cfg.mask_id}), its tokenizer "
                        f"gives {tok.vocab_size} (mask {tok.mask_id})")
    file, ckpt, step, chosen = choose_weights(Path(run), which)
    decoder = CaptionDecoder(dec_cfg)
    try:
        decoder.load_state_dict(checkpoint.read_weights(file, "cpu"))
    except RuntimeError as e:
        why = str(e).splitlines()[0][:160]
        raise UserError(f"{file} does not fit the run's decoder config: {why}") from None
    return LoadedRun(Path(run), record, decoder.to(device).eval(), tok, ckpt, step, chosen)


def trained_precision(run: Path, record: dict) -> str | None:
    """The precision the run trained in: summary.json's resolved one, else config.json's if not
    `auto`."""
    p = (records.read_summary(Path(run)) or {}).get("precision")
    asked = record.get("train", {}).get("precision")
    return p or (asked if asked != "auto" else None)


def open_run_store(record: dict, store_path: Path | None):
    """The run's store (or `store_path`), refusing one encoded by another encoder than the run was
    trained on."""
    from pipeline.store import FeatureStore, encoder_mismatch

    path = Path(store_path or record.get("store", {}).get("path", ""))
    if not str(path) or str(path) == ".":
        raise UserError("the run records no feature store: pass --store")
    store = FeatureStore.open(path)  # one line if missing / not a store / empty
    rec = record.get("store", {}).get("encoder") or {}
    if rec and encoder_mismatch(rec, store.encoder):
        now = store.encoder
        now_kind, rec_kind = now.get("weights", {}).get("kind"), rec.get("weights", {}).get("kind")
        raise UserError(f"{path} was encoded with {now.get('model')} ({now_kind}), but the run was "
                        f"trained on features of {rec.get('model')} ({rec_kind})")
    return store
