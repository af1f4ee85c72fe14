"""The CapPa training objective: which kind each row is, how each kind's rows are built, which
tokens carry loss, the loss sums and the one objective formula that training, validation, early
stopping and the bench share.

Letters as in pipeline/model.py: B rows, L caption length, Lp the parallel rows' length, D width, V
vocab.

Kinds of rows (`KINDS`; a row's kind id indexes it, so a bool `parallel` flag is kind 0 or 1):
  "ar"   autoregressive: inputs BOS + targets shifted right, causal attention, padded keys masked
         (a row's logits never depend on the batch's padding); loss on every real token.
  "par"  parallel (big_vision's masking ratio 1): inputs [MASK] at every position 0..Lp-1, full
  attention;
         loss on the caption's first Lp real tokens. Nothing tells the model the caption's length:
         it must predict where EOS goes, so a parallel row's logits are a function of the image
         alone.
Another kind (a teacher-forced prefix with no loss, then a target) is one more class with `rows` and
an entry in `KINDS` and in `LossSums`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.model import CaptionDecoder

MIXINGS = ("per-example", "per-batch")


# --- which kind each row is -----------------------------------------------------------------------
@dataclass(frozen=True)
class RowMix:
    """How rows are split between the kinds: each row (per-example, big_vision) or each global batch
    (per-batch) is parallel with odds `parallel_fraction`; a parallel row scores at most
    `parallel_len` tokens (None: all of them)."""

    parallel_fraction: float = 0.75
    mixing: str = "per-example"
    parallel_len: Optional[int] = None

    def __post_init__(self):
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be per-example or per-batch, got {self.mixing!r}")

    def draw(self, rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
        """Parallel flag per epoch slot [n] bool, from the caller's generator."""
        if self.mixing == "per-example":
            return rng.random(n) < self.parallel_fraction
        per_batch = rng.random(-(-n // batch_size)) < self.parallel_fraction
        return np.repeat(per_batch, batch_size)[:n]

    def scored_tokens(self, counts: torch.Tensor, parallel: torch.Tensor) -> tuple[int, int]:
        """Real tokens per row [n] and parallel flags [n] (CPU) -> the tokens the loss scores, (AR,
        parallel)."""
        if self.parallel_len:
            counts = torch.where(parallel, counts.clamp(max=self.parallel_len), counts)
        return int(counts[~parallel].sum()), int(counts[parallel].sum())


def split(kinds, b: int) -> list[torch.Tensor]:
    """Kind ids [B] (or a bool parallel flag, or one for all rows) -> row indices of each of
    `KINDS`, on the CPU (one device read of B ids)."""
    ids = torch.as_tensor(kinds).to("cpu", torch.long).expand(b)
    return [(ids == k).nonzero()[:, 0] for k in range(len(KINDS))]


# --- building each kind's rows --------------------------------------------------------------------
class ARRows:
    name = "ar"

    @staticmethod
    def inputs(model: CaptionDecoder, targets, target_mask):
        """targets / target_mask [B, L] -> input tokens [B, L] (BOS + shifted), attention mask [B,
        1, L, L]."""
        cfg = model.cfg
        b, l = targets.shape
        if l > cfg.max_len:
            raise ValueError(f"text length {l} > max_len {cfg.max_len}")
        tokens = torch.cat([targets.new_full((b, 1), cfg.bos_id), targets[:, :-1]], dim=1)
        # Key 0 always stays visible so no query row is fully masked (SDPA would return NaN for it).
        key_ok = target_mask.clone()
        key_ok[:, 0] = True  # [B, L]
        return tokens, (model.causal[:l, :l] & key_ok[:, None, :])[:, None]  # [B, 1, L, L]

    def rows(self, model: CaptionDecoder, features, targets, target_mask):
        """-> hidden states [B, L, D], targets [B, L], positions that carry loss [B, L]."""
        tokens, mask = self.inputs(model, targets, target_mask)
        h = model.hidden(tokens, model.pass_memory(features, tokens.shape[1]), mask)
        return h, targets, target_mask


class ParallelRows:
    name = "par"

    @staticmethod
    def fit(model: CaptionDecoder, targets, target_mask):
        """Targets / mask cut or padded (mask False) to Lp columns -> [B, Lp] each."""
        lp, l = model.parallel_len, targets.shape[1]
        if l >= lp:
            return targets[:, :lp], target_mask[:, :lp]
        return F.pad(targets, (0, lp - l), value=model.cfg.eos_id), F.pad(target_mask, (0, lp - l))

    def rows(self, model: CaptionDecoder, features, targets, target_mask):
        """-> hidden states [B, Lp, D], targets [B, Lp], positions that carry loss [B, Lp]."""
        t, m = self.fit(model, targets, target_mask)
        return model.parallel_hidden(model.pass_memory(features, model.parallel_len)), t, m


KINDS = (ARRows(), ParallelRows())  # kind id 0 = AR (parallel flag False), 1 = parallel


# --- the loss -------------------------------------------------------------------------------------
@dataclass
class LossSums:
    """A batch's summed cross-entropy (nats, float32) and scored-token count (int64) per kind: sums,
    so batches, ranks and log intervals add up exactly; the means are for reading."""

    sum_ar: torch.Tensor  # [] autoregressive rows
    tokens_ar: torch.Tensor  # []
    sum_par: torch.Tensor  # [] parallel rows
    tokens_par: torch.Tensor  # []

    @property
    def loss(self) -> torch.Tensor:
        """The objective of this batch alone: the mean over all its scored tokens."""
        return objective(self, (self.tokens_ar + self.tokens_par).clamp(min=1))

    @property
    def loss_ar(self) -> torch.Tensor:  # mean over the AR rows' tokens (0 when there are none)
        return self.sum_ar / self.tokens_ar.clamp(min=1)

    @property
    def loss_par(self) -> torch.Tensor:
        return self.sum_par / self.tokens_par.clamp(min=1)

    def detach(self) -> "LossSums":
        return LossSums(self.sum_ar.detach(), self.tokens_ar, self.sum_par.detach(),
                        self.tokens_par)


def loss_sums(model: CaptionDecoder, features, targets, target_mask, kinds) -> LossSums:
    """Summed cross-entropy over the scored tokens (EOS included, padding excluded by the mask,
    never by id) and their counts, per kind. features [B, P, E], targets / target_mask [B, L], kinds
    [B].

    Each kind's rows run as one sub-pass (AR at the batch's length L, parallel at Lp). The vocab
    head runs once per batch, on every kind's scored positions only: one [V, D] weight gradient per
    step.
    """
    b = targets.shape[0]
    real_h, real_t = {}, {}  # kind -> [T_kind, D], [T_kind]
    for kind, idx in zip(KINDS, split(kinds, b)):
        if len(idx) == 0:
            continue
        whole = len(idx) == b  # a one-kind batch needs no row gather
        i = idx.to(targets.device)
        f, t, m = (features, targets, target_mask) if whole else \
            (features[i], targets[i], target_mask[i])
        h, t, m = kind.rows(model, f, t, m)
        real_h[kind.name], real_t[kind.name] = h[m], t[m]
    logits = model.head(torch.cat(list(real_h.values())))  # [T, V]
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                         torch.cat(list(real_t.values())), reduction="none")  # [T]
    per_kind = dict(zip(real_t, ce.split([len(t) for t in real_t.values()])))
    none = ce[:0]  # a kind with no rows: sum 0, 0 tokens
    sums = {k.name: per_kind.get(k.name, none).sum() for k in KINDS}
    counts = {k.name: torch.tensor(len(per_kind.get(k.name, none)), device=targets.device)
              for k in KINDS}
    return LossSums(sums["ar"], counts["ar"], sums["par"], counts["par"])


def logits(model: CaptionDecoder, features, targets, target_mask, kinds):
    """-> [B, L, V] in the head's dtype. A parallel row's logits come from its Lp-long pass: columns
    >= Lp (longer batches) have no prediction and are 0 (a uniform distribution)."""
    b, l = targets.shape
    out = model.head.weight.new_zeros(b, l, model.cfg.vocab_size)  # [B, L, V]
    for kind, idx in zip(KINDS, split(kinds, b)):
        if len(idx):
            i = idx.to(targets.device)
            h = kind.rows(model, features[i], targets[i], target_mask[i])[0]  # [Bk, S, D]
            w = min(l, h.shape[1])
            out[i, :w] = model.head(h[:, :w]).to(out.dtype)
    return out


# --- the objective --------------------------------------------------------------------------------
def objective(sums: LossSums, tokens, world: int = 1) -> torch.Tensor:
    """The training objective: mean cross-entropy over the GLOBAL batch's `tokens` scored tokens, of
    every kind, as this rank's share.

    DDP averages gradients over ranks; scaling this rank's summed loss by world / global tokens
    makes that average the exact token mean of the whole batch, whatever each rank's caption
    lengths.
    """
    return (sums.sum_ar + sums.sum_par) * (world / tokens)


def expected_objective(loss_ar: Optional[float], loss_par: Optional[float],
                       parallel_fraction: float) -> Optional[float]:
    """The objective's expectation over the kind draw, from each kind's mean loss (validation runs
    every row as every kind): the kinds' losses mixed as training draws them."""
    if parallel_fraction <= 0.0 or loss_par is None:
        return loss_ar
    if parallel_fraction >= 1.0 or loss_ar is None:
        return loss_par
    return (1.0 - parallel_fraction) * loss_ar + parallel_fraction * loss_par
