"""Atomic checkpoints of a run: safetensors weights + a state file (optimizer, scheduler, step, data position, RNG).

Layout under `<run>/checkpoints/`:
    step-00000200/model.safetensors   the decoder's weights (what eval and caption load); a tied
                                      matrix once, its other names in the header's `aliases`
    step-00000200/state.pt            optimizer, scheduler, step, epoch, batch within epoch, RNG, extras
    step-00000200/manifest.json       {"step", "sha256": {file: digest}}: checked whenever it is loaded
    last.json                         {"step", "epoch", "batch", "dir"}: the newest complete checkpoint
A checkpoint folder is built under a temporary name, every file fsynced, then renamed into place; only
then does `last.json` (itself replaced atomically) point at it. A crash at any moment leaves the previous
checkpoint complete and pointed to. The newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.errors import UserError
from pipeline.osutil import atomic_write_text, fsync_dir

LAST = "last.json"
MANIFEST = "manifest.json"  # in each checkpoint folder: {"step", "sha256": {file: digest}}
# safetensors header key: {alias: stored name} for the state dict's names of a tensor stored under
# another name (a tied matrix: `head.weight` -> `tok_emb.weight`). Files without it store every
# name.
ALIASES = "aliases"


def state_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state dict as it is stored: each tensor once, on the host, plus {alias: stored
    name} for the names of a tensor already stored (tied weights: the [V, D] embedding would
    otherwise be written twice, 154 MB each at the default size)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        # Same storage, offset, shape, strides and dtype: the same tensor under two names. Empty
        # tensors share no bytes worth saving (and may all report storage 0).
        same = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(),
                v.dtype, v.device)
        if v.numel() and same in seen:
            aliases[k] = seen[same]
            continue
        seen[same] = k
        # contiguous() + clone: safetensors refuses strided views and storage shared with others
        tensors[k] = v.detach().contiguous().clone().cpu()
    return tensors, aliases


def save_weights(model: torch.nn.Module, path: Path, step: int) -> str:
    """Write the module's weights to safetensors `path`, each tensor once, with the step, whether
    all are finite and the aliases in its header. -> the file's sha256."""
    tensors, aliases = state_tensors(model)
    finite = all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())
    meta = {"step": str(step), "finite": str(int(finite))}
    if aliases:
        meta[ALIASES] = json.dumps(aliases, sort_keys=True)
    return save_file(tensors, path, metadata=meta)


def _write_bytes(path: Path, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_file(tensors: dict, path: str | Path, metadata: Optional[dict] = None) -> str:
    """safetensors' save_file, but the bytes are written by Python: a full disk is then an OSError (ENOSPC).
    Returns the file's sha256.

    safetensors' own writer raises SafetensorError and torch.save's raises RuntimeError ("unexpected pos")
    on a full disk, which no `except OSError` catches; the serialised copy costs memory once, briefly.
    """
    blob = _canonical_header(safetensors_bytes(tensors, metadata=metadata))
    _write_bytes(Path(path), blob)
    return hashlib.sha256(blob).hexdigest()


def _canonical_header(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal tensors give equal bytes.

    safetensors writes `__metadata__` from a hash map, in an order that changes from one process to the next
    (found by the checkpoint crash sweep). Only the key order changes: the header keeps its length (padding
    spaces), so every data offset stays valid."""
    n = int.from_bytes(blob[:8], "little")
    canon = json.dumps(json.loads(blob[8:8 + n]), separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    if len(canon) > n:  # cannot happen for what safetensors writes; keep its bytes rather than break the file
        return blob
    return blob[:8] + canon + b" " * (n - len(canon)) + blob[8 + n:]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """Torch (CPU and CUDA) and Python RNG states; numpy's global RNG is not used by the pipeline."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: Path, *, model: torch.nn.Module, optimizer, scheduler, step: int, epoch: int, batch: int,
         extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point `last.json` at it. OSError -> UserError, old one intact.

    `epoch`/`batch` are where training continues (the next batch to run); `extra` holds small picklable-free
    values (lists, dicts, numbers, tensors) such as partial metric sums.
    """
    ckpt_dir = Path(ckpt_dir)
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        digest = save_weights(model, tmp / "model.safetensors", step)
        digests = {"model.safetensors": digest or sha256_file(tmp / "model.safetensors")}
        buf = io.BytesIO()  # serialised in memory, written by Python (see save_file)
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": step, "epoch": epoch, "batch": batch,
            "rng": rng_state(),
            "extra": extra or {},
        }, buf)
        digests["state.pt"] = hashlib.sha256(buf.getbuffer()).hexdigest()
        _write_bytes(tmp / "state.pt", buf.getbuffer())
        del buf
        _write_bytes(tmp / MANIFEST, json.dumps({"step": step, "sha256": digests}).encode())
        fsync_dir(tmp)
        if final.exists():  # the same step saved again: move the old copy aside (last() falls back meanwhile)
            trash = ckpt_dir / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        atomic_write_text(ckpt_dir / LAST, json.dumps({"step": step, "epoch": epoch, "batch": batch, "dir": name,
                                                       "sha256": digests}))
        fsync_dir(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint in {ckpt_dir}: {e.strerror or e} "
                        f"(the previous checkpoint is untouched)") from None
    _prune(ckpt_dir, keep)
    return final


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the one last.json points at), and the
    temp folders a killed writer left behind (one writer per run: a temp seen after our save is stale)."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    pointed = last(ckpt_dir)
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    finite = [p for p in steps if is_finite(p)]
    spare = {pointed, finite[-1] if finite else None}  # never the newest finite one: NaN weights help nobody
    for p in steps[:-keep] if keep > 0 else []:
        if p not in spare:
            shutil.rmtree(p, ignore_errors=True)


def is_finite(path: Path) -> bool:
    """Whether a checkpoint's weights were all finite when saved (recorded in the safetensors header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
            return (f.metadata() or {}).get("finite", "1") == "1"
    except Exception:  # noqa: BLE001 - unreadable: not a good checkpoint to keep for its finiteness
        return False


def last(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None; never a half-written one.

    `last.json` says which; if it is missing or points nowhere (a crash between two renames), the newest
    `step-*` folder is used: such a folder only appears by renaming a fully written, fsynced one.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        path = ckpt_dir / json.loads((ckpt_dir / LAST).read_text())["dir"]
        if (path / "model.safetensors").is_file() and (path / "state.pt").is_file():
            return path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def check(path: Path) -> str | None:
    """Why a checkpoint folder's bytes are not the ones saved (sha256 vs its manifest), or None if they are.

    A deleted manifest of the checkpoint `last.json` points at is made good by the copy of its digests there;
    checkpoints saved before digests were recorded have neither: they pass unchecked.
    """
    path = Path(path)
    try:
        want = json.loads((path / MANIFEST).read_text())["sha256"]
    except FileNotFoundError:
        want = _pointed_digests(path)
        if want is None:
            return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"
    if not isinstance(want, dict) or not all(isinstance(d, str) for d in want.values()):
        return f"unreadable {MANIFEST} (no digests)"
    for name, digest in want.items():
        try:
            got = sha256_file(path / name)
        except OSError as e:
            return f"{name}: {e.strerror or e}"
        if got != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _pointed_digests(path: Path) -> dict | None:
    """The sha256 digests `last.json` holds for checkpoint folder `path`, if it points there."""
    try:
        rec = json.loads((path.parent / LAST).read_text())
        return rec["sha256"] if rec.get("dir") == path.name else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def resolve(path: Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a `checkpoints/` folder or a run folder (its newest good one).

    The bytes are checked against the digests saved with them: a corrupt newest checkpoint (or a corrupt
    `step-N` folder named directly, as `--resume` does) falls back to the previous good one with a warning; if
    none is good it is one line.
    """
    path = Path(path)
    if (path / "model.safetensors").is_file():
        if path.name.startswith("step-"):
            return _newest_good(path, path.parent)
        why = check(path)
        if why:
            raise UserError(f"checkpoint {path} is corrupt: {why}")
        return path
    for d in (path, path / "checkpoints"):
        found = last(d)
        if found is not None:
            return _newest_good(found, d)
    raise UserError(f"no complete checkpoint in {path}")


def _newest_good(newest: Path, d: Path) -> Path:
    """`newest` if its bytes match its digests, else the newest older `step-*` in `d` that does (warning)."""
    candidates = [newest] + sorted((p for p in d.glob("step-*") if p != newest and p.name < newest.name and
                                    (p / "state.pt").is_file()), reverse=True)
    bad = []
    for c in candidates:
        why = check(c)
        if why is None:
            if bad:
                from pipeline.progress import console

                console.print(f"warning: checkpoint {bad[0][0].name} is corrupt ({bad[0][1]}); using "
                              f"{c.name} instead", highlight=False, markup=False)
            return c
        bad.append((c, why))
    raise UserError(f"every checkpoint in {d} is corrupt (newest {bad[0][0].name}: {bad[0][1]}); "
                    "there is nothing good to load")


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The decoder's state dict from a run folder, its `checkpoints/` folder or one checkpoint folder."""
    return read_weights(resolve(path) / "model.safetensors", device)


def read_weights(file: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's state dict, every name present: a tied matrix stored once comes back
    under each of its names (one tensor), so `load_state_dict` fills a tied model as it was saved.
    Files written before ties were stored once hold both copies and load as they are."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(file), device=str(device))
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: bytes that are not a safetensors file
        raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}); the checkpoint is "
                        "damaged") from None
    try:
        aliases = json.loads(meta.get(ALIASES, "{}"))
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise UserError(f"{file}: its `{ALIASES}` header does not name its own tensors; the "
                        "checkpoint is damaged") from None
    return tensors


STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch", "rng", "extra")


def read_state(file: Path, device) -> dict:
    """state.pt, loaded with torch's weights-only unpickler, which builds tensors and plain containers and
    refuses any other object: a state file swapped for an arbitrary pickle is one line, and nothing in it runs."""
    import pickle

    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not a checkpoint state file this pipeline wrote ({type(e).__name__}); it "
                        "was not unpickled. Resume from another checkpoint or start a new --run") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS) or \
            not all(isinstance(state[k], int) and not isinstance(state[k], bool) for k in ("step", "epoch", "batch")):
        raise UserError(f"{file}: not a checkpoint state file this pipeline wrote (its keys or values differ)")
    return state


def load(path: Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
         device: str | torch.device = "cpu", restore_rng: bool = True) -> dict[str, Any]:
    """Restore a checkpoint folder into model (+ optimizer, scheduler, RNG); returns the state dict."""
    path = resolve(path)  # checked once here
    state = read_state(path / "state.pt", device)
    try:
        model.load_state_dict(read_weights(path / "model.safetensors", device))
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # shapes or keys of another model
        raise UserError(f"checkpoint {path} does not fit this run's model or optimizer "
                        f"({str(e).splitlines()[0][:120]})") from None
    if restore_rng:
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()  # map_location moved it; the CPU generator wants a CPU ByteTensor
        if "cuda" in rng:
            rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        set_rng_state(rng)
    return state
