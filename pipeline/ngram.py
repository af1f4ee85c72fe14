"""Text-only baseline: an interpolated n-gram language model over the decoder's own token ids (no image, no torch).

It answers "what does the image add?" from the language side: a decoder whose autoregressive validation loss
is not below this model's has learnt less than counting the training captions would. Its loss is measured
exactly as the decoder's: nats per target token, the caption's tokens plus EOS, every caption starting after
BOS. Smoothing is interpolated absolute discounting (Kneser-Ney's discount, without the continuation counts),
down to a uniform distribution over the full vocabulary, so every token has a non-zero probability.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence


class NGramLM:
    """Interpolated n-gram LM. `fit` on id sequences that end with EOS (as `Tokenizer.encode` returns them)."""

    def __init__(self, order: int, vocab_size: int, bos_id: int, eos_id: int, discount: float = 0.75):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order, self.vocab_size, self.bos, self.eos, self.d = order, vocab_size, bos_id, eos_id, discount
        # counts[k][context of length k] = Counter(next token)
        self.counts: list[dict[tuple, Counter]] = [defaultdict(Counter) for _ in range(order)]
        self.totals: list[dict[tuple, int]] = [defaultdict(int) for _ in range(order)]

    def _contexts(self, seq: Sequence[int]) -> Iterable[tuple[tuple, int]]:
        hist = (self.bos,) * (self.order - 1)
        for t in seq:
            yield hist, t
            hist = (hist + (t,))[1:] if self.order > 1 else ()  # the last order-1 tokens

    def fit(self, sequences: Iterable[Sequence[int]]) -> "NGramLM":
        for seq in sequences:
            for hist, t in self._contexts(seq):
                for k in range(self.order):
                    ctx = hist[len(hist) - k:] if k else ()
                    self.counts[k][ctx][t] += 1
                    self.totals[k][ctx] += 1
        return self

    def prob(self, hist: tuple, t: int) -> float:
        """P(t | the last order-1 tokens of hist), interpolated from the longest seen context down to uniform."""
        p = 1.0 / self.vocab_size
        for k in range(self.order):
            ctx = hist[len(hist) - k:] if k else ()
            total = self.totals[k].get(ctx, 0)
            if not total:
                break  # a longer context is unseen too
            c = self.counts[k][ctx]
            p = (max(c.get(t, 0) - self.d, 0.0) + self.d * len(c) * p) / total
        return p

    def nll(self, sequences: Iterable[Sequence[int]]) -> tuple[float, int]:
        """(summed negative log-likelihood in nats, target tokens) over id sequences ending with EOS."""
        total, n = 0.0, 0
        for seq in sequences:
            for hist, t in self._contexts(seq):
                total -= math.log(self.prob(hist, t))
                n += 1
        return total, n

    def loss(self, sequences: Iterable[Sequence[int]]) -> float | None:
        s, n = self.nll(sequences)
        return s / n if n else None

    def most_likely(self, max_len: int, beam: int = 8) -> list[int]:
        """The most likely caption (ids ending with EOS, or cut at max_len) by a beam search over seen successors.

        Length-normalised like the decoder's beam search (summed log-prob / length), so the baseline is the
        caption a text-only model would write for every image."""
        beams: list[tuple[float, tuple]] = [(0.0, ())]
        finished: list[tuple[float, tuple]] = []
        for _ in range(max_len):
            cand = []
            for lp, seq in beams:
                hist = ((self.bos,) * (self.order - 1) + seq)[-(self.order - 1):] if self.order > 1 else ()
                succ = self._successors(hist)
                for t in succ:
                    cand.append((lp + math.log(self.prob(hist, t)), seq + (t,)))
            cand.sort(key=lambda x: -x[0])
            beams = []
            for lp, seq in cand:
                if seq[-1] == self.eos:
                    finished.append((lp / len(seq), seq))
                elif len(beams) < beam:
                    beams.append((lp, seq))
                if len(beams) == beam and len(finished) >= beam:
                    break
            if not beams:
                break
        if not finished:  # nothing ended within max_len: the best unfinished one
            finished = [(lp / len(seq), seq) for lp, seq in beams]
        return list(max(finished, key=lambda x: x[0])[1])

    def _successors(self, hist: tuple) -> list[int]:
        for k in range(self.order - 1, -1, -1):  # the longest seen context's successors
            ctx = hist[len(hist) - k:] if k else ()
            if self.totals[k].get(ctx):
                return list(self.counts[k][ctx])
        return [self.eos]


def warning(ar_loss: float | None, baseline: dict | None) -> str | None:
    """The loud line for a decoder whose autoregressive val loss does not beat the text-only n-gram's, else None."""
    ng = (baseline or {}).get("val_loss")
    if ar_loss is None or ng is None or ar_loss < ng:
        return None
    return (f"the decoder's autoregressive val loss {ar_loss:.3f} does not beat a text-only {baseline['order']}-gram "
            f"model of the training captions ({ng:.3f}): it has learnt less than counting words would")


def fit_baseline(tokenizer, train_ids: Sequence[Sequence[int]], val_ids: Sequence[Sequence[int]],
                 max_len: int, order: int = 3) -> dict:
    """The text-only baseline of a run: an `order`-gram fitted on the training captions' ids (EOS
    included, as `Tokenizer.encode_ids` gives them: a run passes its cached token ids, so captions are
    not tokenised again), scored on validation.

    -> {"order", "val_loss" (nats/token, as the decoder's AR loss), "val_tokens", "caption" (its most likely
    caption, the same for every image), "train_captions"}."""
    lm = NGramLM(order, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id).fit(train_ids)
    s, n = lm.nll(val_ids)
    return {"order": order, "val_loss": s / n if n else None, "val_tokens": n,
            "caption": tokenizer.decode(lm.most_likely(max_len - 1)), "train_captions": len(train_ids)}
