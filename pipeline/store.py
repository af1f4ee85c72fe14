"""The zarr v3 feature store: layout, create/extend, write one shard + its done marker, read slabs (no torch)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.lock import FolderLock
from pipeline.osutil import fsync_dir

FORMAT = "cappa-features/1"
CHUNK_TARGET_BYTES = 2 << 20  # >= ~1 MB per features chunk: big sequential reads, few files
STRING_ARRAYS = ("keys", "captions", "meta")


ARRAYS = ("features", "valid", "shard_done", *STRING_ARRAYS)
SIZES = ("tokens", "width", "shard_capacity", "chunk_rows")


def damaged(file: Path, why: str) -> UserError:
    """The one line for a store file whose content a reader cannot trust."""
    return UserError(f"{file}: {why}; the feature store is damaged: re-encode into a new --store (or rebuild "
                     "this one with --overwrite)")


def check_layout(path: Path, attrs: dict, arrays: dict) -> None:
    """Every attribute a reader trusts, checked for type and range against the arrays' real shapes.

    The arrays may be longer than `shards` says (an `extend` grows them before the attribute), never shorter.
    """
    def bad(why: str, file: Path = path / "zarr.json"):
        raise damaged(file, why)

    for k in SIZES:
        v = attrs.get(k)
        if type(v) is not int or v < 1:
            bad(f"{k} is {v!r}, not a positive whole number")
    shards = attrs.get("shards")
    if not (isinstance(shards, list) and all(isinstance(x, str) and x for x in shards)
            and len(set(shards)) == len(shards)):
        bad(f"shards is not a list of distinct shard names ({str(shards)[:60]})")
    if not isinstance(attrs.get("encoder"), dict):
        bad(f"encoder is {str(attrs.get('encoder'))[:60]!r}, not a record of the encoder")
    for k, kind in (("precision", str), ("problems", dict), ("last_run", dict)):
        if attrs.get(k) is not None and not isinstance(attrs[k], kind):
            bad(f"{k} is {str(attrs[k])[:60]!r}, not a {kind.__name__}")
    t, e, c, cr, s = (*(attrs[k] for k in SIZES), len(shards))
    feats = arrays["features"]
    if feats.ndim != 3 or feats.dtype != np.float16 or tuple(feats.shape[1:]) != (t, e):
        bad(f"tokens x width is {t} x {e}, but the features array is {feats.dtype} {list(feats.shape)}")
    if feats.chunks[0] != cr or c % cr:
        bad(f"chunk_rows is {cr}, but the features chunks hold {feats.chunks[0]} rows (shard_capacity {c})")
    for name in ARRAYS:
        a, need = arrays[name], s if name == "shard_done" else s * c
        if a.ndim != (3 if name == "features" else 1) or a.shape[0] < need:
            bad(f"shard_capacity is {c} for {s} shards ({need} rows), but {name} holds {a.shape[0]}")
        if name not in ("features", "shard_done") and a.chunks[0] != c:
            bad(f"shard_capacity is {c}, but {name} is stored in chunks of {a.chunks[0]} rows")
        if name in ("valid", "shard_done") and a.dtype != np.bool_:
            bad(f"{name} holds {a.dtype}, not booleans", path / name / "zarr.json")


class Texts(Sequence):
    """A text column as one numpy StringDType array [n] (~16 bytes a row, plus the text past 15
    bytes; no Python object per row). Items are str; it equals a list of the same strings."""

    __slots__ = ("values",)
    __hash__ = None

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.dtypes.StringDType())

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return str(self.values[i])
        return Texts(self.values[i])  # a slice or an array of positions

    def __iter__(self):
        return iter(self.values)

    def __eq__(self, other) -> bool:
        if isinstance(other, Texts):
            return bool(np.array_equal(self.values, other.values))
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.values.tolist() == list(other)
        return NotImplemented

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __repr__(self) -> str:
        return f"Texts({len(self)} rows)"


class StoreIndex:
    """Valid rows of done shards, in row order: their keys and captions in memory; their metadata
    read from the store only for the rows a stage asks for (`meta_of`)."""

    def __init__(self, store: "FeatureStore", rows: np.ndarray, keys: Texts, captions: Texts):
        self.store = store
        self.rows = rows  # int64 [n] store rows
        self.keys = keys  # [n]
        self.captions = captions  # [n]

    def __len__(self) -> int:
        return len(self.rows)

    def meta_of(self, positions) -> list[str]:
        """JSON text of index positions `positions` ("" where the shard had none), reading only the
        chunks that hold them."""
        return self.store.text_at("meta", self.rows[np.asarray(positions, dtype=np.int64)]).tolist()

    @functools.cached_property
    def meta(self) -> list[str]:
        """Every row's JSON text: the whole column, kept (a stage that needs a few rows:
        `meta_of`)."""
        return self.meta_of(np.arange(len(self)))


def chunk_rows_for(capacity: int, tokens: int, width: int) -> int:
    """Rows per features chunk: the smallest divisor of the shard capacity whose chunk reaches the target size.

    A divisor of the capacity keeps every chunk inside one shard's region, so one writer owns each chunk.
    """
    row_bytes = tokens * width * 2
    for d in range(1, capacity + 1):
        if capacity % d == 0 and d * row_bytes >= CHUNK_TARGET_BYTES:
            return d
    return capacity


def weights_label(weights: dict) -> str:
    """One-line description of an encoder's weights, e.g. `random-init (seed 0)` or `hub timm/vit_...`."""
    kind = weights.get("kind", "?")
    if kind == "random-init":
        return f"random-init (seed {weights.get('seed')})"
    if kind == "hub":
        return f"hub {weights.get('hub_id')}"
    if kind == "file":
        return f"file {Path(str(weights.get('path', '?'))).name} (sha256 {str(weights.get('sha256', '?'))[:12]})"
    return kind


def weights_identity(weights: dict) -> str:
    """What makes two encoders' weights the same: the loaded tensors, whatever file, format or source held them."""
    return weights.get("state_sha256") or repr(sorted(weights.items()))


def encoder_mismatch(recorded: dict, now: dict) -> str | None:
    """How encoder provenance `now` differs from `recorded` (model, weights, preprocessing), or None when the
    two make the same features. The one check behind "this store / run was made by another encoder"."""
    if recorded.get("model") != now.get("model"):
        return f"model {recorded.get('model')} vs {now.get('model')}"
    if weights_identity(recorded.get("weights", {})) != weights_identity(now.get("weights", {})):
        return f"weights {weights_label(recorded.get('weights', {}))} vs {weights_label(now.get('weights', {}))}"
    if "preprocessing" in recorded and recorded["preprocessing"] != now.get("preprocessing"):
        return "preprocessing (timm data config)"
    return None


def is_replaceable(path: Path) -> bool:
    """What `--overwrite` may delete: an empty folder, or a folder whose zarr.json says it is a cappa store."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("attributes") or {}).get("format") == FORMAT


def _clean_leftovers(path: Path) -> None:
    """Temp folders of a create that was killed (the caller holds the store lock: nobody else writes them)."""
    for p in path.parent.glob(f".{path.name}.*"):
        if p.name.endswith((".tmp", ".old")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder under `path` (zarr renames its writes into place but never fsyncs)."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


class StoreLock(FolderLock):
    """`<store>.lock` beside the store: a second encoder refuses instead of corrupting (pipeline/lock.py)."""

    def __init__(self, store: Path):
        super().__init__(store, who="encoder", noun="the feature store")


class FeatureStore:
    """A zarr group of [N, T, E] float16 features plus keys, captions, meta and per-shard done markers.

    Shard `s` (position in `shards`) owns rows [s*C, (s+1)*C), C = shard capacity; its samples fill the
    first rows in the shard's own order. Readers only ever see done shards.
    """

    def __init__(self, path: Path, group, writable: bool):
        self.path = Path(path)
        self.group = group
        self.writable = writable
        self.attrs = dict(group.attrs)
        self.arrays = {name: self._open_array(name) for name in ARRAYS}
        check_layout(self.path, self.attrs, self.arrays)
        self._features = self.arrays["features"]

    def _open_array(self, name: str):
        try:
            return self.group[name]
        except Exception as e:  # noqa: BLE001 - a missing or garbled array zarr.json: KeyError, JSON, ...
            raise damaged(self.path / name / "zarr.json", f"missing or unreadable ({type(e).__name__})") from None

    # --- opening ------------------------------------------------------------------------------------------
    @classmethod
    def _open_group(cls, path: Path, mode: str):
        import zarr

        path = Path(path)
        if not path.exists():
            raise UserError(f"feature store {path} does not exist: run `pipeline encode` first")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
            attrs = dict(group.attrs)
        except Exception as e:  # noqa: BLE001 - zarr raises several types for "not a group" / bad JSON
            raise UserError(f"{path / 'zarr.json'}: not a zarr v3 feature store ({type(e).__name__}); "
                            "choose another --store (or rebuild this one with --overwrite)") from None
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not a cappa feature store (format {attrs.get('format')!r})")
        return group

    @classmethod
    def open(cls, path: Path | str, require_done: bool = True) -> "FeatureStore":
        """Read-only view. Fails with one line if missing, not a store, or (by default) no shard is done."""
        st = cls(Path(path), cls._open_group(Path(path), "r"), writable=False)
        if require_done and not st.shard_done().any():
            raise UserError(f"feature store {path} has no finished shard yet: run `pipeline encode`")
        return st

    @classmethod
    def open_for_write(cls, path: Path | str) -> "FeatureStore":
        """Writable view of an existing store (the caller holds the StoreLock)."""
        return cls(Path(path), cls._open_group(Path(path), "r+"), writable=True)

    @classmethod
    def create(cls, path: Path | str, *, encoder: dict, tokens: int, width: int, shard_capacity: int,
               shards: list[str], chunk_rows: int | None = None, attrs: dict | None = None,
               overwrite: bool = False) -> "FeatureStore":
        """A new empty store for `shards` (names in row order). `overwrite` replaces an existing one."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise UserError(f"{path} already exists (use --overwrite to replace it)")
            if not is_replaceable(path):  # never rmtree what we did not make: a shards folder, a file, ...
                raise UserError(f"--overwrite refuses to replace {path}: it is not a cappa feature store (no "
                                f"zarr.json saying {FORMAT}); nothing was deleted. Choose another --store")
        chunk_rows = chunk_rows or chunk_rows_for(shard_capacity, tokens, width)
        if shard_capacity % chunk_rows:
            raise ValueError(f"chunk_rows {chunk_rows} must divide shard_capacity {shard_capacity}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(path)
        # Built under a temp name and renamed into place: a store either exists whole (with its format
        # attribute) or not at all, so a kill mid-create never leaves a folder that `open` refuses.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            cls._build(tmp, encoder=encoder, tokens=tokens, width=width, shard_capacity=shard_capacity,
                       shards=shards, chunk_rows=chunk_rows, attrs=attrs)
        except BaseException:  # a full disk mid-create: leave nothing behind (a kill leaves it to the next create)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():  # checked above: an empty folder or a cappa store; moved aside, then deleted
            trash = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, trash)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return cls.open_for_write(path)

    @staticmethod
    def _build(tmp: Path, *, encoder: dict, tokens: int, width: int, shard_capacity: int, shards: list[str],
               chunk_rows: int, attrs: dict | None) -> None:
        import zarr

        n = len(shards) * shard_capacity
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        # float16 features barely compress (~10%); uncompressed chunks keep the training loader's reads cheap.
        # Each chunk carries a crc32c: a flipped bit on disk is an error naming its shard, never silent noise.
        from zarr.codecs import Crc32cCodec

        g.create_array("features", shape=(n, tokens, width), chunks=(chunk_rows, tokens, width),
                       dtype="float16", fill_value=0, compressors=[Crc32cCodec()])
        # The text and marker columns are checked too: zstd alone (no checksum) can decode damaged bytes into
        # other captions without a word.
        from zarr.codecs import ZstdCodec

        checked = [ZstdCodec(level=0, checksum=False), Crc32cCodec()]
        g.create_array("valid", shape=(n,), chunks=(shard_capacity,), dtype=bool, fill_value=False,
                       compressors=checked)
        for name in STRING_ARRAYS:
            g.create_array(name, shape=(n,), chunks=(shard_capacity,), dtype=str, compressors=checked)
        g.create_array("shard_done", shape=(len(shards),), chunks=(1,), dtype=bool, fill_value=False,
                       compressors=checked)
        meta = {
            "format": FORMAT, "encoder": encoder, "tokens": int(tokens), "width": int(width),
            "shard_capacity": int(shard_capacity), "chunk_rows": int(chunk_rows), "shards": list(shards),
            "versions": {"zarr": zarr.__version__, "numpy": np.__version__},
        }
        meta.update(attrs or {})
        g.attrs.update(meta)
        fsync_tree(tmp)

    # --- attributes -----------------------------------------------------------------------------------------
    @property
    def encoder(self) -> dict:
        return self.attrs["encoder"]

    @property
    def is_random_init(self) -> bool:
        return self.encoder.get("weights", {}).get("kind") == "random-init"

    @property
    def tokens(self) -> int:
        return int(self.attrs["tokens"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])

    @property
    def shard_capacity(self) -> int:
        return int(self.attrs["shard_capacity"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def shards(self) -> list[str]:
        return list(self.attrs["shards"])

    def set_attrs(self, **kv) -> None:
        """Merge top-level attributes (zarr writes zarr.json atomically)."""
        self._need_write()
        self.group.attrs.update(kv)
        self.attrs.update(kv)

    @property
    def has_checksums(self) -> bool:
        """Whether the features chunks carry crc32c (stores made before it was added do not)."""
        return any(type(c).__name__ == "Crc32cCodec" for c in self._features.metadata.codecs)

    @property
    def text_checked(self) -> bool:
        """Whether valid/keys/captions/meta carry crc32c and are stored for every done shard (newer stores)."""
        return any(type(c).__name__ == "Crc32cCodec" for c in self.arrays["valid"].metadata.codecs)

    def shard_of_row(self, row: int) -> str:
        return self.shards[min(int(row) // self.shard_capacity, len(self.shards) - 1)]

    def _corrupt(self, a: int, b: int, e: Exception) -> UserError:
        """One line naming the shard(s) whose chunks in rows [a, b) fail their checksum (re-read chunk by chunk)."""
        cr, names = self.chunk_rows, []
        for lo in range(a - a % cr, b, cr):
            try:
                self._features[lo:lo + cr]
            except ValueError:
                if self.shard_of_row(lo) not in names:
                    names.append(self.shard_of_row(lo))
        names = names or [self.shard_of_row(a)]
        return UserError(f"feature store {self.path}: shard {', '.join(names)} is corrupt on disk "
                         f"({str(e).split('.')[0]}); `pipeline verify --store {self.path}` lists every bad shard; "
                         "re-encode into a new --store (or rebuild this one with --overwrite)")

    def _missing(self, done: np.ndarray | None = None,
                 valid: np.ndarray | None = None) -> dict[str, dict[str, list[Path]]]:
        """Chunk files of done shards that a reader needs but that are absent: {shard: {array: [files]}}.

        zarr reads an absent chunk as its fill value (zeros, False, ""), so a deleted file would read as empty
        rows. Stores with checked text columns write those chunks even when empty, so every one must exist;
        older stores skip chunks equal to the fill value, so there a chunk counts as missing only when the
        shard's other files show it held something (valid rows, or another column stored).
        """
        # done [S] and valid [S * C] as the caller read them: each read costs a pass over S chunks
        done = self.shard_done() if done is None else done
        valid = self._valid() if valid is None else valid
        c, cr = self.shard_capacity, self.chunk_rows
        out: dict[str, dict[str, list[Path]]] = {}
        for s in np.flatnonzero(done):
            files = {a: self._chunk_file(a, (s,)) for a in ("valid", *STRING_ARRAYS)}
            has = {a: f.is_file() for a, f in files.items()}
            rows = valid[s * c:(s + 1) * c].any()
            need = list(files) if self.text_checked else \
                [a for a in ("keys", "captions") if rows] + (["valid"] if any(has[a] for a in STRING_ARRAYS) else [])
            gone = {a: [files[a]] for a in need if not has[a]}
            feats = [self._chunk_file("features", (i, 0, 0)) for i in range(s * c // cr, (s + 1) * c // cr)
                     if valid[i * cr:(i + 1) * cr].any()]
            if lost := [f for f in feats if not f.is_file()]:
                gone["features"] = lost
            if gone:
                out[self.shards[s]] = gone
        return out

    def missing_chunks(self) -> dict[str, str]:
        """Done shards with chunks missing on disk: {shard: what is missing}."""
        return {name: ", ".join(f"{len(f)} features chunk(s)" if a == "features" else f"the {a} chunk"
                                for a, f in gone.items()) + " missing on disk"
                for name, gone in self._missing().items()}

    def _column(self, name: str, n: int) -> np.ndarray:
        """The first n values of a 1-D array (`_span`)."""
        return self._span(name, 0, n)

    def _span(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Values [lo, hi) of a 1-D array. A chunk that does not decode (checksum, zstd or UTF-8
        error) is one line naming its file."""
        a = self.arrays[name]
        try:
            return np.asarray(a[lo:hi])
        except Exception as e:  # noqa: BLE001 - each codec raises its own type
            per, why = a.chunks[0], f"{type(e).__name__}: {str(e).split('.')[0][:80]}"
            for i in range(lo // per, -(-hi // per)):
                try:
                    a[max(i * per, lo):min((i + 1) * per, hi)]
                except Exception:  # noqa: BLE001
                    shard = self.shards[i] if name == "shard_done" else self.shard_of_row(i * per)
                    raise damaged(self._chunk_file(name, (i,)), f"shard {shard}'s {name} cannot be read "
                                  f"({why})") from None
            raise damaged(self.path / name, f"cannot be read ({why})") from None

    def text_at(self, name: str, rows: np.ndarray) -> np.ndarray:
        """A text column's values at store rows `rows` [k] (any order), reading only the chunks that
        hold them: each run of neighbouring chunks in one read."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.dtypes.StringDType())
        if not len(rows):
            return out
        per = self.arrays[name].chunks[0]
        chunks = np.unique(rows // per)
        cuts = np.flatnonzero(np.diff(chunks) != 1) + 1
        for run in np.split(chunks, cuts):
            lo, hi = int(run[0]) * per, (int(run[-1]) + 1) * per
            inside = (rows >= lo) & (rows < hi)
            out[inside] = self._span(name, lo, hi)[rows[inside] - lo]
        return out

    def _check_stored(self, name: str, shards: np.ndarray) -> None:
        """That a text column's chunks of `shards` would decode, without decoding them: their crc32c
        against their bytes (a reader that needs the values decodes them later, `text_at`). Stores
        without checksums are decoded and dropped."""
        if not self.text_checked:
            for s in shards.tolist():
                self._span(name, *self.region(s))
            return
        import google_crc32c  # zarr's own crc32c (Crc32cCodec): the last 4 bytes, little-endian

        for s in shards.tolist():
            f = self._chunk_file(name, (s,))
            data = np.frombuffer(f.read_bytes(), dtype=np.uint8)
            if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:],
                                                                                 "little"):
                raise damaged(f, f"shard {self.shards[s]}'s {name} cannot be read "
                              "(checksum mismatch)")

    def region(self, s: int) -> tuple[int, int]:
        c = self.shard_capacity
        return s * c, (s + 1) * c

    # The `shards` attribute is the truth: `extend` grows the arrays first and the attribute last, so a reader
    # that opens mid-extend sees arrays at least as long as its shard list and reads only its own part.
    def shard_done(self) -> np.ndarray:
        return self._column("shard_done", len(self.shards)).astype(bool)  # [S]

    def _valid(self) -> np.ndarray:
        return self._column("valid", len(self.shards) * self.shard_capacity).astype(bool)  # [S * C]

    def shard_counts(self) -> dict[str, int]:
        """Samples stored per shard name (0 for shards not done)."""
        done, valid = self.shard_done(), self._valid()
        per = valid.reshape(len(done), self.shard_capacity).sum(1) if len(done) else np.zeros(0, int)
        return {name: int(per[s]) if done[s] else 0 for s, name in enumerate(self.shards)}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # --- writing --------------------------------------------------------------------------------------------
    def _need_write(self) -> None:
        if not self.writable:
            raise RuntimeError("feature store opened read-only")

    def extend(self, new_shards: list[str]) -> list[int]:
        """Append shards after a larger fetch; returns their positions. Only one process may call this."""
        self._need_write()
        old = self.shards
        dup = set(old) & set(new_shards)
        if dup:
            raise ValueError(f"shards already in the store: {sorted(dup)[:3]}")
        if not new_shards:
            return []
        shards = old + list(new_shards)
        n = len(shards) * self.shard_capacity
        for name in ("features", "valid", *STRING_ARRAYS):
            a = self.group[name]
            a.resize((n, *a.shape[1:]))
        self.group["shard_done"].resize((len(shards),))
        self.set_attrs(shards=shards)
        self.arrays = {name: self.group[name] for name in ARRAYS}
        self._features = self.arrays["features"]
        return list(range(len(old), len(shards)))

    def write_shard(self, s: int, features: np.ndarray, keys: list[str], captions: list[str],
                    meta: list[str]) -> None:
        """Write shard `s`'s rows (its whole region, zero-padded, so reruns are bitwise equal), then mark it done."""
        self._need_write()
        n, c = len(keys), self.shard_capacity
        if not (features.shape == (n, self.tokens, self.width) and len(captions) == n and len(meta) == n):
            raise ValueError(f"shard {s}: features {features.shape} vs {n} keys/captions/meta")
        if n > c:
            raise ValueError(f"shard {s} has {n} samples, more than the shard capacity {c}")
        start, stop = self.region(s)
        self.group["shard_done"][s] = False
        block = np.zeros((c, self.tokens, self.width), dtype=np.float16)  # [C, T, E]
        block[:n] = features
        self._features[start:stop] = block
        pad = [""] * (c - n)
        # Stored even when all-empty (zarr skips a chunk equal to the fill value by default), so a reader can
        # tell a deleted chunk from an empty one.
        dense = {"write_empty_chunks": self.text_checked}
        for name, col in (("keys", keys), ("captions", captions), ("meta", meta)):
            self.arrays[name].with_config(dense)[start:stop] = np.array(list(col) + pad, dtype=object)
        self.arrays["valid"].with_config(dense)[start:stop] = np.arange(c) < n
        self._fsync_shard(s)  # the marker promises the rows are on disk, not in the page cache
        self.group["shard_done"][s] = True  # last: the marker says every row above is on disk
        self._fsync_files([self._chunk_file("shard_done", (s,))])

    def _chunk_file(self, array: str, idx: tuple) -> Path:
        enc = self.arrays[array].metadata.chunk_key_encoding
        return self.path / array / enc.encode_chunk_key(idx)

    def _fsync_shard(self, s: int) -> None:
        c, cr = self.shard_capacity, self.chunk_rows
        files = [self._chunk_file("features", (i, 0, 0)) for i in range(s * c // cr, (s + 1) * c // cr)]
        files += [self._chunk_file(name, (s,)) for name in ("valid", *STRING_ARRAYS)]
        self._fsync_files(files)

    @staticmethod
    def _fsync_files(files: list[Path]) -> None:
        for d in sorted({f.parent for f in files}):
            for f in files:
                if f.parent == d and f.is_file():  # an all-padding chunk is not stored at all
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            if d.is_dir():
                fsync_dir(d)

    # --- reading --------------------------------------------------------------------------------------------
    def index(self) -> StoreIndex:
        """The valid rows of done shards with their keys and captions; a missing or undecodable
        chunk (metadata too: checked, not read), or a valid row without a key, is one line (never
        rows read as empty)."""
        done, stored = self.shard_done(), self._valid()
        valid = stored & np.repeat(done, self.shard_capacity)
        rows = np.flatnonzero(valid).astype(np.int64)
        missing = self._missing(done, stored)
        if missing:
            names = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
            kinds = "/".join(sorted({a for gone in missing.values() for a in gone}))
            first = next(iter(next(iter(missing.values())).values()))[0]
            raise UserError(f"{first} is missing: shard(s) {names} are marked done but miss {kinds} chunks on "
                            f"disk; run `pipeline verify --store {self.path}`, then re-encode them")
        keys, captions = (Texts(self._column(name, len(valid))[rows])
                          for name in ("keys", "captions"))
        if len(rows) and (blank := np.flatnonzero(keys.values == "")).size:
            names = sorted({self.shard_of_row(r) for r in rows[blank]})
            raise damaged(self.path / "keys",
                          f"valid rows of shard(s) {', '.join(names[:3])} have no key")
        self._check_stored("meta", np.flatnonzero(done))
        return StoreIndex(self, rows, keys, captions)

    def read(self, start: int, stop: int) -> np.ndarray:
        """float16 [stop-start, T, E]; chunk-aligned ranges read fastest. A bad checksum: one line naming the shard."""
        try:
            return np.asarray(self._features[start:stop])
        except ValueError as e:
            raise self._corrupt(start, stop, e) from None
