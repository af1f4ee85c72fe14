"""Batches of (features, caption tokens, kind flags) from the feature store: held in memory or
streamed.

Letters: N samples in the store index, B global batch, b this rank's share, P image tokens, E
encoder width, L caption tokens of the batch (dynamic padding).

Data order is a pure function of (seed, epoch): the slabs of the split (chunk-aligned row ranges of
the store) are permuted, cut into shuffle groups of `buffer_slabs` slabs, and the rows of each group
are permuted. With one group covering everything this is a uniform permutation (the in-memory
default); a streamed epoch reads one group at a time, so memory stays bounded. With `length_buckets`
= k, each window of k global batches (cut again at group edges) is then grouped by caption length,
so a batch is padded to about its own rows' length instead of the longest of 32 random captions; the
window's batches run in a random order. Each row's kind (parallel / AR, `objective.RowMix`) is drawn
for the whole epoch from a generator seeded by (seed, epoch), so a resumed run only needs (epoch,
batch).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from pipeline.objective import RowMix
from pipeline.token_cache import tokenize

# Stream tags of the per-epoch generators, so order and kind draws never share random numbers.
_ORDER, _KINDS, _BUCKETS = 1, 2, 3
_SPLIT_SALT = b"cappa-val-split-v1"  # changing it changes every run's validation split


def split_positions(keys: list[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions into `keys`, decided by a keyed hash of each key alone.

    Stable across runs, machines, Python hash seeds and store growth: a sample's side never changes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, key=_SPLIT_SALT).digest(), "little") >> 11
         for k in keys),
        dtype=np.float64, count=len(keys),
    )
    is_val = h / float(1 << 53) < val_fraction  # uniform in [0, 1)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class CaptionTokens:
    """Caption token ids [N, W] (EOS-padded, uint16 or int32: `token_cache.tokenize`) and lengths
    [N] on the CPU: tokenised here, or the store's token cache (`of`, the ids then a read-only map
    of its file)."""

    def __init__(self, tokenizer, captions, max_len: int, chunk: int = 65536):
        self._set(*tokenize(tokenizer, captions, max_len, chunk))

    @classmethod
    def of(cls, ids: np.ndarray, lengths: np.ndarray) -> "CaptionTokens":
        self = cls.__new__(cls)
        self._set(ids, lengths)
        return self

    def _set(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.ids = ids  # [N, W]
        self.count = torch.from_numpy(np.asarray(lengths, dtype=np.int64))  # tokens per caption [N]
        self.extent = self.count  # last real token + 1: a caption's ids start at column 0

    def __len__(self) -> int:
        return len(self.count)

    def take(self, pos: np.ndarray) -> "CaptionTokens":
        """The captions at positions `pos`, in that order (a copy)."""
        pos = np.asarray(pos, dtype=np.int64)
        return CaptionTokens.of(self.ids[pos], self.count.numpy()[pos])

    def id_lists(self, pos: np.ndarray) -> list[list[int]]:
        """Each caption's ids at positions `pos` (EOS included, no padding), as `encode_ids`
        gives them."""
        pos = np.asarray(pos, dtype=np.int64)
        counts = self.count.numpy()[pos].tolist()
        return [self.ids[p, :n].tolist() for p, n in zip(pos.tolist(), counts)]

    def batch(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """targets [k, L] int64 and mask [k, L] bool, padded only to the longest caption among
        `pos`."""
        width = max(int(self.extent[pos].max()), 1) if len(pos) else 1
        targets = torch.from_numpy(self.ids[np.asarray(pos), :width].astype(np.int64))
        return targets, torch.arange(width) < self.count[pos].unsqueeze(1)


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class FeatureSource:
    """The store's features for index positions: `held` (one fp16 tensor, on the device) or streamed
    slabs. `placement` is where they live: "memory" or "stream" (--features)."""

    def __init__(self, store, rows: np.ndarray, *, device: torch.device, placement: str = "auto",
                 budget_fraction: float = 0.4, slab_rows: int = 256, progress=None):
        self.store, self.rows, self.device = store, np.asarray(rows, dtype=np.int64), device
        self.tokens, self.width = int(store.tokens), int(store.width)
        chunk = int(getattr(store, "chunk_rows", 8) or 8)
        self.slab_rows = max(chunk, slab_rows // chunk * chunk)  # whole chunks: no chunk is read twice
        self.nbytes = len(self.rows) * self.tokens * self.width * 2
        self.placement = self.resolve_placement(placement, self.nbytes, device, budget_fraction)
        self.held: Optional[torch.Tensor] = None
        if self.placement == "memory":
            self.held = self._load_all(progress)

    @staticmethod
    def resolve_placement(placement: str, nbytes: int, device: torch.device,
                          budget_fraction: float = 0.4) -> str:
        """auto -> memory if `nbytes` fit in `budget_fraction` of RAM (and of GPU memory on CUDA),
        else stream."""
        if placement not in ("auto", "memory", "stream"):
            raise ValueError(f"features must be auto, memory or stream, got {placement!r}")
        if placement != "auto":
            return placement
        budget = budget_fraction * ram_bytes()
        if device.type == "cuda":
            budget = min(budget, budget_fraction * torch.cuda.get_device_properties(device).total_memory)
        return "memory" if nbytes <= budget else "stream"

    def slabs(self, rows: np.ndarray) -> np.ndarray:
        return rows // self.slab_rows

    def _read_rows(self, rows: np.ndarray, out: torch.Tensor, dest: np.ndarray, progress=None) -> None:
        """out[dest[i]] = features of store row rows[i], reading each touched slab once, in row
        order."""
        srt = np.argsort(rows, kind="stable")
        rows, dest = rows[srt], dest[srt]
        slab_ids = self.slabs(rows)
        cuts = np.flatnonzero(np.diff(slab_ids)) + 1
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist()):
            r, d = rows[lo:hi], dest[lo:hi]
            start = int(slab_ids[lo]) * self.slab_rows
            slab = torch.from_numpy(self.store.read(start, int(r[-1]) + 1))  # [n, P, E] fp16, one contiguous read
            if not (len(r) == len(slab) and r[0] == start):  # not every row in order: gather the wanted ones
                slab = slab.index_select(0, torch.from_numpy(r - start))
            if out.device.type == "cpu" and bool(np.all(np.diff(d) == 1)):
                out[int(d[0]):int(d[-1]) + 1] = slab  # a plain slice copy (index_put is ~10x slower)
            else:
                out.index_copy_(0, torch.from_numpy(d).to(out.device), slab.to(out.device, non_blocking=True))
            if progress is not None:
                progress(hi - lo)
        # One thread: concurrent zarr reads from 2-4 threads measured 2.7-3.6x slower here than
        # serial ones (0.23 s serial for six 77 MB slabs); a read runs at ~1.6 GB/s from the page
        # cache.

    def _load_all(self, progress) -> torch.Tensor:
        out = torch.empty(len(self.rows), self.tokens, self.width, dtype=torch.float16, device=self.device)
        self._read_rows(self.rows, out, np.arange(len(self.rows)), progress)
        return out

    def read_positions(self, pos: np.ndarray, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp16 [k, P, E] for index positions `pos`, in that order (host memory when streamed),
        written into the first k rows of `buffer` when one with room is given (fresh pages cost ~0.3
        s/GB to fault in)."""
        if self.held is not None:
            return self.held.index_select(0, torch.from_numpy(np.asarray(pos, dtype=np.int64)).to(self.device))
        if buffer is not None and len(buffer) >= len(pos):
            out = buffer[:len(pos)]
        else:
            out = torch.empty(len(pos), self.tokens, self.width, dtype=torch.float16)
        self._read_rows(self.rows[pos], out, np.arange(len(pos)))
        return out


@dataclass
class Batch:
    features: torch.Tensor  # [b, P, E] float32 on the device
    targets: torch.Tensor  # [b, L] int64
    target_mask: torch.Tensor  # [b, L] bool, True = real token (EOS included)
    parallel: torch.Tensor  # [b] bool, True = parallel-prediction row (the row's kind id)
    positions: np.ndarray  # [b] index positions of the rows
    tokens_ar: int  # scored tokens in AR rows of the GLOBAL batch (all ranks), for exact DDP loss scaling
    tokens_par: int
    size: int  # samples in the global batch

    @classmethod
    def of(cls, features, targets, target_mask, parallel, parallel_len: Optional[int] = None) -> "Batch":
        """A one-process batch of given tensors (benchmarks, tests): its token counts are read from
        the mask (a parallel row counts at most `parallel_len` tokens, as the loss scores them)."""
        ar, par = RowMix(parallel_len=parallel_len).scored_tokens(target_mask.sum(1).cpu(), parallel.cpu())
        return cls(features, targets, target_mask, parallel, np.arange(len(targets)), ar, par, len(targets))


class Loader:
    """Epochs of batches over `positions`; rank r of `world` takes its contiguous slice of each
    global batch."""

    def __init__(self, source: FeatureSource, tokens: CaptionTokens, positions: np.ndarray,
                 batch_size: int, *, seed: int = 0, mix: RowMix = RowMix(), shuffle: bool = True,
                 buffer_slabs: Optional[int] | str = "auto", length_buckets: int = 0, rank: int = 0,
                 world: int = 1, prefetch: int = 2):
        self.source, self.tokens = source, tokens
        self.positions = np.sort(np.asarray(positions, dtype=np.int64))
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.mix = mix  # which kind each row is, and the tokens each kind scores
        self.rank, self.world, self.prefetch = rank, world, prefetch
        # Shuffle group in slabs; None = one group = a uniform shuffle. It fixes the data order,
        # whichever way the features are read (a streamed epoch holds one group at a time, so stream
        # with a bounded one); "auto" = 8 when streaming, else None.
        if buffer_slabs == "auto":
            buffer_slabs = 8 if source.placement == "stream" else None
        self.buffer_slabs = buffer_slabs
        if length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {length_buckets}")
        self.length_buckets = length_buckets
        n = len(self.positions)
        # A last global batch too small to give every rank a row is dropped (only ever with world >
        # 1).
        self.num_batches = n // batch_size + (1 if n % batch_size >= max(world, 1) and n % batch_size else 0)

    def __len__(self) -> int:
        return self.num_batches

    # -- the plan of an epoch: pure functions of (seed, epoch) -------------------------------------
    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in epoch order [n], shuffle-group start offsets [G]) for this epoch."""
        pos = self.positions
        slab = self.source.slabs(self.source.rows[pos])
        uniq, slab_idx = np.unique(slab, return_inverse=True)
        if not self.shuffle:
            group = slab_idx // self.buffer_slabs if self.buffer_slabs else np.zeros(len(pos), np.int64)
            order = pos  # already in row order
        else:
            rng = np.random.default_rng([self.seed, epoch, _ORDER])
            rank_of_slab = np.empty(len(uniq), np.int64)
            rank_of_slab[rng.permutation(len(uniq))] = np.arange(len(uniq))
            group = rank_of_slab[slab_idx] // (self.buffer_slabs or max(len(uniq), 1))
            key = rng.random(len(pos))
            srt = np.lexsort((key, group))
            order, group = pos[srt], group[srt]
        starts = np.flatnonzero(np.r_[True, np.diff(group) != 0]) if len(group) else np.zeros(0, np.int64)
        if self.length_buckets and len(order):
            order = self._bucket(order, starts, epoch)
        return order, starts

    def _bucket(self, order: np.ndarray, starts: np.ndarray, epoch: int) -> np.ndarray:
        """Group each window of `length_buckets` global batches (cut at shuffle-group edges) by
        caption extent, in a random batch order.

        A window's slots fall into chunks at the global batch boundaries (a window cut at a group
        edge may start or end mid-batch). Its rows, sorted by extent, fill the chunks in a random
        order: each batch holds rows of similar length, and successive batches do not run short to
        long. Rows never leave their window, so shuffle groups (and a streamed epoch's memory bound)
        are kept.
        """
        n, bs = len(order), self.batch_size
        edge = np.zeros(n, bool)
        edge[starts] = True
        edge[:: self.length_buckets * bs] = True
        w_lo = np.flatnonzero(edge)
        w_hi = np.r_[w_lo[1:], n]
        rng = np.random.default_rng([self.seed, epoch, _BUCKETS])
        extent = self.tokens.extent.numpy()[order]
        out = np.empty_like(order)
        for lo, hi in zip(w_lo.tolist(), w_hi.tolist()):
            srt = order[lo:hi][np.argsort(extent[lo:hi], kind="stable")]  # by length, ties keep their order
            cuts = np.r_[lo, np.arange((lo // bs + 1) * bs, hi, bs), hi]  # the window's parts of batches
            perm = rng.permutation(len(cuts) - 1) if self.shuffle else np.arange(len(cuts) - 1)
            taken = 0
            for c in perm.tolist():  # chunk perm[0] gets the shortest rows, and so on
                size = int(cuts[c + 1] - cuts[c])
                out[cuts[c]:cuts[c + 1]] = srt[taken:taken + size]
                taken += size
        return out

    def kinds(self, epoch: int) -> np.ndarray:
        """Parallel flag per epoch slot [n] bool (`RowMix.draw`)."""
        rng = np.random.default_rng([self.seed, epoch, _KINDS])
        return self.mix.draw(rng, len(self.positions), self.batch_size)

    # -- iteration ---------------------------------------------------------------------------------
    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch.. of `epoch`, prepared by a background thread one or two batches
        ahead."""
        return _Prefetch(self._batches(epoch, start_batch), self.prefetch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order, starts = self.order(epoch)
        kinds = self.kinds(epoch)
        stream = None if self.source.held is not None else _GroupStream(self.source, order, starts)
        dev = self.source.device
        B = self.batch_size
        for b in range(start_batch, self.num_batches):
            glo, ghi = b * B, min((b + 1) * B, len(order))
            cuts = np.linspace(glo, ghi, self.world + 1).astype(np.int64)  # near-equal contiguous slices
            lo, hi = int(cuts[self.rank]), int(cuts[self.rank + 1])
            pos = order[lo:hi]
            counts = self.tokens.count[torch.from_numpy(order[glo:ghi])]
            tokens_ar, tokens_par = self.mix.scored_tokens(counts, torch.from_numpy(kinds[glo:ghi]))
            feats = self.source.read_positions(pos) if stream is None else stream.take(lo, hi)
            targets, mask = self.tokens.batch(torch.from_numpy(pos))
            par = torch.from_numpy(kinds[lo:hi].copy())
            if dev.type == "cuda":  # page-locked copies, so the host-to-device copies below run asynchronously
                feats, targets, mask, par = (_pinned(t) for t in (feats, targets, mask, par))
            yield Batch(
                features=feats.to(dev, non_blocking=True).float(),  # fp16 over the bus, fp32 on the device
                targets=targets.to(dev, non_blocking=True),
                target_mask=mask.to(dev, non_blocking=True),
                parallel=par.to(dev, non_blocking=True),
                positions=pos,
                tokens_ar=tokens_ar,
                tokens_par=tokens_par,
                size=ghi - glo,
            )


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A host tensor in a fresh page-locked buffer (one already on the device stays). Always a copy:
    a streamed batch views a group buffer that is refilled later, and an asynchronous copy may still
    be reading it then; PyTorch's pinned-memory cache keeps a pinned block until the copies that
    read it are done."""
    return t if t.device.type != "cpu" else t.pin_memory()


class _GroupStream:
    """Features of an epoch's order, read one shuffle group at a time (bounded memory)."""

    def __init__(self, source: FeatureSource, order: np.ndarray, starts: np.ndarray):
        self.source, self.order = source, order
        self.bounds = np.r_[starts, len(order)].astype(np.int64)
        # (lo, hi, fp16 [hi-lo, P, E], the buffer it lives in) per resident group, in epoch order
        self.pieces: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self.next_group = 0
        self.spare: Optional[torch.Tensor] = None  # a passed group's buffer, reused for the next group

    def take(self, lo: int, hi: int) -> torch.Tensor:
        """fp16 [hi-lo, P, E] for epoch slots [lo, hi); calls move forward through the epoch.

        The returned tensor may view a group buffer that is reused once the epoch moves past that
        group: callers copy it (the loader converts it to fp32) before the next call."""
        for _, b, _, buf in self.pieces:
            if b <= lo and (self.spare is None or len(buf) > len(self.spare)):  # a group behind us
                self.spare = buf
        self.pieces = [p for p in self.pieces if p[1] > lo]
        # Skip groups wholly before `lo` (a resumed epoch starts mid-way) without reading them.
        while self.next_group < len(self.bounds) - 1 and self.bounds[self.next_group + 1] <= lo:
            self.next_group += 1
        while (self.pieces[-1][1] if self.pieces else lo) < hi:
            g_lo, g_hi = int(self.bounds[self.next_group]), int(self.bounds[self.next_group + 1])
            buf, self.spare = self.spare, None
            if buf is None or len(buf) < g_hi - g_lo:
                buf = torch.empty(g_hi - g_lo, self.source.tokens, self.source.width, dtype=torch.float16)
            self.pieces.append((g_lo, g_hi, self.source.read_positions(self.order[g_lo:g_hi], buf), buf))
            self.next_group += 1
        parts = [t[max(lo, a) - a:min(hi, b) - a] for a, b, t, _ in self.pieces if a < hi and b > lo]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Prefetch:
    """Runs a batch generator in a daemon thread, `depth` batches ahead; errors re-raise in the
    consumer."""

    _END = object()

    def __init__(self, gen: Iterator[Batch], depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(gen,), daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, gen) -> None:
        try:
            for item in gen:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self.q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def __del__(self):
        self.stop.set()
