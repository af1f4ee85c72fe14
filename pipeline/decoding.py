"""Decoding with a CaptionDecoder, through its public API (`memory`, `hidden`, `parallel_hidden`,
`head`): the KV cache, greedy, beam search (finished pool, length penalty), CapPa parallel, and
scoring.

Letters as in pipeline/model.py: B images, K beams, N = B*K text rows, T generated tokens, V
vocabulary, Lp the parallel rows' fixed length. The length of a caption counts its EOS (a caption
that runs to max_new_tokens without EOS has length max_new_tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.objective import ARRows

if TYPE_CHECKING:
    from pipeline.model import CaptionDecoder


class KVCache:
    """Self-attention keys/values of the tokens generated so far, preallocated to the longest
    length."""

    def __init__(self, max_len: int):
        self.max_len, self.len, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):  # k, v [N, H, T, D/H] -> all keys/values so far [N, H, len, D/H]
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        t = k.shape[2]
        self.k[:, :, self.len : self.len + t] = k
        self.v[:, :, self.len : self.len + t] = v
        self.len += t
        return self.k[:, :, : self.len], self.v[:, :, : self.len]

    def reorder(self, index):  # beam search: row i continues from row index[i]
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


def next_logp(model: CaptionDecoder, h):
    """Hidden states [N, D] -> [N, V] float32 log-probs; [MASK] is never generated."""
    logp = model.head(h).float()
    logp[:, model.cfg.mask_id] = -math.inf
    return logp.log_softmax(-1)


class _Steps:
    """Next-token log-probs of N growing AR rows: with the KV cache (image K/V once, self-attention
    K/V appended per step) or without it (the whole prefix and the image K/V re-run every step)."""

    def __init__(self, model, features, max_new_tokens: int, use_cache: bool):
        self.m, self.features, self.use_cache = model, features, use_cache
        self.kvs = model.memory(features) if use_cache else None
        self.caches = [KVCache(max_new_tokens) for _ in model.blocks] if use_cache else None

    def __call__(self, seq, t: int):  # seq [N, 1+t] incl. BOS -> [N, V] float32 log-probs
        m = self.m
        if self.use_cache:
            h = m.hidden(seq[:, -1:], self.kvs, start=t, caches=self.caches)[:, -1]  # [N, D]
        else:
            h = m.hidden(seq, m.memory(self.features), causal=True)[:, -1]  # [N, D]
        return next_logp(m, h)

    def reorder(self, src):  # row i continues from row src[i]
        for c in self.caches or ():
            c.reorder(src)


def _check(model, max_new_tokens: int) -> None:
    if not 1 <= max_new_tokens <= model.cfg.max_len:
        raise ValueError(f"max_new_tokens must be in 1..{model.cfg.max_len}")


@torch.no_grad()
def greedy(model, features, *, max_new_tokens: int, use_cache: bool = True):
    """Argmax at every step -> ids [B, T]: stops when every row has said EOS; EOS padding after a
    row's EOS."""
    _check(model, max_new_tokens)
    eos = model.cfg.eos_id
    step = _Steps(model, features, max_new_tokens, use_cache)
    b, dev = features.shape[0], features.device
    seq = torch.full((b, 1), model.cfg.bos_id, dtype=torch.long, device=dev)  # [B, 1+t] incl. BOS
    done = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    for t in range(max_new_tokens):
        tok = step(seq, t).argmax(-1).masked_fill(done, eos)  # [B]
        seq = torch.cat([seq, tok[:, None]], dim=1)
        done = done | (tok == eos)
        if bool(done.all()):
            break
    return seq[:, 1:]


@dataclass
class Beams:
    """The finished pool of a beam search: the best K hypotheses per image, best first."""

    sequences: torch.Tensor  # [B, K, T] ids, EOS-padded after a hypothesis' EOS
    scores: torch.Tensor  # [B, K] summed log-prob / length**length_penalty (-inf: an empty slot)
    lengths: torch.Tensor  # [B, K] tokens incl. EOS
    log_probs: torch.Tensor  # [B, K] summed log-prob

    def best(self):  # -> [B, T'] the top hypothesis of each image, cut to the longest of them
        top = self.sequences[:, 0]
        return top[:, : max(int(self.lengths[:, 0].max()), 1)]


def final_score(log_prob, length, length_penalty: float):
    return log_prob / length.to(log_prob.dtype) ** length_penalty


@torch.no_grad()
def beam_search(model, features, *, max_new_tokens: int, beam_size: int,
                length_penalty: float = 1.0, use_cache: bool = True,
                early_stop: bool = True) -> Beams:
    """Beam search as in HF transformers / fairseq -> the finished pool (`Beams`).

    Each step takes the top 2K continuations of an image's K alive hypotheses. One that ends in EOS
    and ranks within the top K moves to the image's finished pool, which keeps the best K by summed
    log-prob / length**length_penalty; the alive set is refilled with the best K continuations that
    do not end, so the search keeps its width while beams finish. At max_new_tokens the alive
    hypotheses are pooled too.

    An image stops early once its pool holds K hypotheses and no alive one can still beat the worst
    of them. That test is exact, not HF's heuristic (which divides by the current length): an alive
    hypothesis with summed log-prob s <= 0 after t tokens (none of them EOS) ends with log-prob s'
    <= s at some length l in [t+1, max_new_tokens], so its final score is at most max(s / (t+1)**a,
    s / max_new_tokens**a) (s / l**a is monotone in l; a = length_penalty, any sign). With a > 0
    that bound assumes every further token is free, so a search often runs to max_new_tokens; with a
    = 0 it stops as soon as the pool's worst beats the best alive sum. early_stop=False always runs
    to max_new_tokens (the same pool, for tests and comparisons).
    """
    _check(model, max_new_tokens)
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    b, k, eos, dev = features.shape[0], beam_size, model.cfg.eos_id, features.device
    n, steps_max, a = b * k, max_new_tokens, float(length_penalty)
    step = _Steps(model, features, max_new_tokens, use_cache)
    seq = torch.full((n, 1), model.cfg.bos_id, dtype=torch.long, device=dev)  # [N, 1+t] incl. BOS
    alive = torch.zeros(b, k, device=dev)  # [B, K] summed log-probs
    alive[:, 1:] = -math.inf  # all beams start identical: only the first one expands at step 0
    pool = _Pool(b, k, steps_max, eos, a, dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    rank = torch.arange(2 * k, device=dev)
    base = torch.arange(b, device=dev)[:, None] * k  # [B, 1] first row of each image
    for t in range(steps_max):
        logp = step(seq, t)  # [N, V]
        v = logp.shape[1]
        cand, idx = (alive.view(n, 1) + logp).view(b, k * v).topk(2 * k, dim=1)  # [B, 2K] best 1st
        src = base + idx // v  # [B, 2K] row each candidate extends
        tok = idx % v  # [B, 2K]
        ends = tok == eos
        # Candidate sequences without BOS: [B, 2K, t+1]
        cand_seq = torch.cat([seq[src.view(-1), 1:].view(b, 2 * k, t), tok[..., None]], 2)
        fin = ends & (rank < k) & torch.isfinite(cand) & ~done[:, None]
        if bool(fin.any()):
            pool.add(cand_seq, cand, t + 1, fin)
        keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :k]  # 1st K non-EOS
        alive = cand.gather(1, keep)  # [B, K]
        rows = src.gather(1, keep).view(n)
        seq = torch.cat([seq[rows], tok.gather(1, keep).view(n, 1)], 1)
        step.reorder(rows)
        if t + 1 == steps_max:
            break
        if not early_stop:
            continue
        done = done | pool.beats(alive, t, steps_max)
        if bool(done.all()):
            break
    if not bool(done.all()):  # hypotheses still alive ran to max_new_tokens (or stopped): pool them
        ok = torch.isfinite(alive) & ~done[:, None]
        pool.add(seq[:, 1:].view(b, k, -1), alive, seq.shape[1] - 1, ok)
    return Beams(pool.seq, pool.score, pool.len, pool.lp)


class _Pool:
    """Each image's finished hypotheses: the best K by final score, best first."""

    def __init__(self, b: int, k: int, steps_max: int, eos: int, length_penalty: float, dev):
        self.b, self.k, self.steps_max, self.eos, self.dev = b, k, steps_max, eos, dev
        self.a = length_penalty
        self.seq = torch.full((b, k, steps_max), eos, dtype=torch.long, device=dev)  # [B, K, T]
        self.score = torch.full((b, k), -math.inf, device=dev)  # [B, K]
        self.len = torch.ones(b, k, dtype=torch.long, device=dev)
        self.lp = torch.full((b, k), -math.inf, device=dev)

    def add(self, cand_seq, cand_lp, length: int, ok):
        """Merge candidates [B, C, t] (log-prob [B, C], eligible [B, C]) of one length into the
        pool."""
        b, c, dev = self.b, cand_seq.shape[1], self.dev
        lens = torch.full((b, c), length, dtype=torch.long, device=dev)
        score = final_score(cand_lp, lens, self.a)
        score = torch.where(ok, score, torch.full_like(cand_lp, -math.inf))
        padded = torch.full((b, c, self.steps_max), self.eos, dtype=torch.long, device=dev)
        padded[:, :, : cand_seq.shape[2]] = cand_seq
        all_score = torch.cat([self.score, score], 1)  # [B, K+C]
        self.score, top = all_score.topk(self.k, dim=1)  # best first
        gather = top[..., None].expand(-1, -1, self.steps_max)
        self.seq = torch.cat([self.seq, padded], 1).gather(1, gather)
        self.len = torch.cat([self.len, lens], 1).gather(1, top)
        self.lp = torch.cat([self.lp, cand_lp], 1).gather(1, top)

    def beats(self, alive, t: int, steps_max: int):
        """[B] True where the pool is full and no alive hypothesis (summed log-probs [B, K] after
        t+1 tokens) can still beat its worst: the exact bound of `beam_search`'s docstring."""
        a = self.a
        best_alive = alive.max(1).values  # [B]; rows hold t+1 tokens, so they end at length >= t+2
        bound = torch.maximum(best_alive / float(t + 2) ** a, best_alive / float(steps_max) ** a)
        bound = torch.where(torch.isfinite(best_alive), bound, best_alive)
        full = torch.isfinite(self.score).all(1)
        return full & (self.score[:, -1] >= bound)


def cut_at_eos(tokens, eos: int):
    """ids [B, L] -> [B, T]: every position after a row's first EOS set to EOS, then the columns
    after the longest row's end dropped (T = the longest caption incl. its EOS, or L if a row never
    ends)."""
    ended = (tokens == eos).cumsum(1) > 0  # [B, L] first EOS and after
    tokens = tokens.masked_fill(ended, eos)
    length = (~ended).sum(1) + ended.any(1).long()  # [B] incl. EOS
    return tokens[:, : max(int(length.max()), 1)]


@torch.no_grad()
def parallel(model, features, *, refine_steps: int = 0):
    """CapPa parallel decoding -> ids [B, T], T <= Lp.

    One pass over Lp all-[MASK] positions (the training rows' length) predicts every token at once
    (argmax); the caption ends at its first EOS. No length is given or searched: the model predicts
    where EOS goes. Refinement (mask-predict): pass s of S re-masks the n*(S-s)/(S+1) least
    confident tokens among the caption's n (up to its current first EOS) and re-predicts them with
    the rest visible. Training only ever showed fully masked rows (masking ratio 1), so refinement
    is a comparison mode.
    """
    if refine_steps < 0:
        raise ValueError("refine_steps must be >= 0")
    cfg, lp = model.cfg, model.parallel_len
    b = features.shape[0]
    kvs = model.memory(features)
    logp = next_logp(model, model.parallel_hidden(kvs).flatten(0, 1)).view(b, lp, -1)  # [B, Lp, V]
    conf, tokens = logp.max(-1)  # [B, Lp]
    pos = torch.arange(lp, device=features.device)
    for s in range(refine_steps):
        ended = (tokens == cfg.eos_id).cumsum(1) > 0
        n = (~ended).sum(1) + ended.any(1).long()  # [B] caption length incl. EOS
        n_mask = n * (refine_steps - s) // (refine_steps + 1)  # [B]
        inside = pos[None] < n[:, None]  # [B, Lp]
        order = conf.masked_fill(~inside, math.inf).argsort(1).argsort(1)  # 0 = least confident
        redo = (order < n_mask[:, None]) & inside
        h = model.hidden(tokens.masked_fill(redo, cfg.mask_id), kvs)  # full attention over Lp
        new_conf, new_tok = next_logp(model, h.flatten(0, 1)).view(b, lp, -1).max(-1)
        tokens, conf = torch.where(redo, new_tok, tokens), torch.where(redo, new_conf, conf)
    return cut_at_eos(tokens, cfg.eos_id)


@torch.no_grad()
def generate(model: CaptionDecoder, features, *, max_new_tokens: int, beam_size: int = 1,
             length_penalty: float = 1.0, use_cache: bool = True):
    """Autoregressive captions -> ids [B, T], T <= max_new_tokens; rows padded with EOS after they
    end.

    beam_size=1: greedy. Else beam search (`beam_search`): K alive hypotheses per image, finished
    ones kept in a pool of the best K, ranked by summed log-prob / length**length_penalty.
    use_cache=False re-runs the whole prefix (and image K/V) every step: the naive baseline.
    """
    if beam_size == 1:
        return greedy(model, features, max_new_tokens=max_new_tokens, use_cache=use_cache)
    return beam_search(model, features, max_new_tokens=max_new_tokens, beam_size=beam_size,
                       length_penalty=length_penalty, use_cache=use_cache).best()


@torch.no_grad()
def score(model: CaptionDecoder, features, targets, target_mask):
    """Summed AR log-likelihood of each caption -> [N] float32 (zero-shot ranking of candidates).

    features [B, P, E]; targets / target_mask [N, L] with N = B*C: rows i*C .. i*C+C-1 are the C
    candidate captions of image i (the image's K/V are shared, not copied).
    """
    n = targets.shape[0]
    if n % features.shape[0]:
        raise ValueError("targets rows must be a multiple of the images")
    tokens, mask = ARRows.inputs(model, targets, target_mask)
    h = model.hidden(tokens, model.memory(features), mask)[target_mask]  # [T_real, D]: real only
    nll = F.cross_entropy(model.head(h).float(), targets[target_mask], reduction="none")  # [T_real]
    row = torch.arange(n, device=targets.device)[:, None].expand_as(target_mask)
    row = row[target_mask]  # [T_real]
    return torch.zeros(n, device=targets.device).index_add_(0, row, -nll)
