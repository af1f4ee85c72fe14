"""CapPa caption decoder: pre-LN self-attn / cross-attn / MLP blocks over cached image tokens, AR + parallel modes.

Dimension letters used in shape comments:
  B: batch (images)            L: text length (tokens)      P: image tokens (patches, 197 for ViT-B/16)
  E: encoder (feature) width   D: decoder width             V: vocabulary (50,258 = GPT-2 + [MASK])
  H: attention heads           K: beams                     N: text rows (B, or B*K / B*C rows per image)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    layers: int = 6
    width: int = 768
    heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 50258
    max_len: int = 77
    encoder_width: int = 768
    mask_id: int = 50257
    bos_id: int = 50256
    eos_id: int = 50256


class KVCache:
    """Self-attention keys/values of the tokens generated so far, preallocated to the longest length."""

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


def _heads(x, h):  # [N, T, D] -> [N, H, T, D/H]
    n, t, d = x.shape
    return x.view(n, t, h, d // h).transpose(1, 2)


def _merge(x):  # [N, H, T, D/H] -> [N, T, D]
    n, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(n, t, h * hd)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x, mask=None, cache: KVCache | None = None, causal=False):
        q, k, v = (_heads(t, self.h) for t in self.qkv(x).chunk(3, dim=-1))  # 3 x [N, H, T, D/H]
        if cache is not None:
            k, v = cache.append(k, v)  # [N, H, S, D/H], S = tokens so far
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(_merge(y))


class CrossAttention(nn.Module):
    """Text queries attend to the image tokens; keys/values are computed once per image (`memory`)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h = cfg.heads
        self.q = nn.Linear(cfg.width, cfg.width, bias=False)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)

    def memory(self, img):  # [B, P, D] -> 2 x [B, H, P, D/H]
        k, v = self.kv(img).chunk(2, dim=-1)
        return _heads(k, self.h), _heads(v, self.h)

    def forward(self, x, kv):
        if isinstance(kv, torch.Tensor):
            return self.absorbed(x, kv)
        k, v = kv  # [B, H, P, D/H]
        b, n, t = k.shape[0], x.shape[0], x.shape[1]
        g = n // b  # text rows per image (beams, candidate captions): stacked as extra queries, so
        q = _heads(self.q(x), self.h)  # [N, H, T, D/H]          the image K/V are never copied
        if g > 1:
            q = q.view(b, g, self.h, t, -1).transpose(1, 2).reshape(b, self.h, g * t, -1)  # [B, H, G*T, D/H]
        y = F.scaled_dot_product_attention(q, k, v)
        if g > 1:
            y = y.view(b, self.h, g, t, -1).transpose(1, 2).reshape(n, self.h, t, -1)  # [N, H, T, D/H]
        return self.out(_merge(y))

    def absorbed(self, x, img):
        """The same attention with the K/V projections moved off the image tokens. x [B, T, D], img [B, P, D].

        Per head, scores q_h (W_k,h img)^T = (q_h W_k,h) img^T and output A (img W_v,h^T) = (A img) W_v,h^T:
        the D x D projections then run on T text tokens instead of P image tokens, for an extra 2*T*P*D*H
        multiply-adds in the attention itself. Cheaper when T is short (training: a caption of ~20 tokens vs
        197 image tokens); generation keeps `memory` (K/V once per image, reused at every step).
        """
        b, t, d = x.shape
        h, hd = self.h, d // self.h
        wk, wv = self.kv.weight.view(2, h, hd, d).unbind(0)  # [H, D/H, D] each
        # Head-major [H, B*T, .] layouts, so the per-head weights are bmm operands as they are (no copies).
        q = (self.q(x) * hd**-0.5).view(b * t, h, hd).transpose(0, 1)  # [H, B*T, D/H]
        qk = torch.bmm(q, wk).view(h, b, t, d).transpose(0, 1).reshape(b, h * t, d)  # [B, H*T, D]
        att = torch.softmax(torch.bmm(qk, img.transpose(1, 2)), dim=-1)  # [B, H*T, P]
        y = torch.bmm(att, img).view(b, h, t, d).transpose(0, 1).reshape(h, b * t, d)  # [H, B*T, D]
        y = torch.bmm(y, wv.transpose(1, 2))  # [H, B*T, D/H]
        return self.out(y.transpose(0, 1).reshape(b, t, d))


# The absorbed path's batched matmuls and layout copies run at ~60% of the rate of the standard path's large
# image K/V matmuls (CPU, fp32, seed sizes, measured): it is taken only when it wins after that discount.
ABSORBED_DISCOUNT = 1.7


def _cross_flops(cfg: DecoderConfig, text_len: float, image_tokens: int, cross: str) -> tuple[float, float]:
    """Forward FLOPs per layer of the part of cross-attention that differs between the two forms, as
    (matmuls that read the image tokens directly, the rest). "kv": image K/V 2*P*2D^2, scores and sum
    2*2*L*P*D. "absorbed": scores and sum over full-width image tokens per head 2*2*L*P*D*H, K/V weights
    applied on the text side 2*L*2D^2."""
    l, p, d, h = text_len, image_tokens, cfg.width, cfg.heads
    if cross == "kv":
        return 2 * p * 2 * d * d, 4 * l * p * d
    if cross == "absorbed":
        return 4 * l * p * d * h, 2 * l * 2 * d * d
    raise ValueError(f"cross must be kv or absorbed, got {cross!r}")


def absorb_cross(text_len: int, image_tokens: int, cfg: DecoderConfig) -> bool:
    """Whether the absorbed cross-attention (`CrossAttention.absorbed`) is the faster one at this text length:
    fewer FLOPs (`_cross_flops`) after ABSORBED_DISCOUNT. At the seed's sizes it wins up to T = 29 tokens."""
    return (ABSORBED_DISCOUNT * sum(_cross_flops(cfg, text_len, image_tokens, "absorbed"))
            < sum(_cross_flops(cfg, text_len, image_tokens, "kv")))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.width
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(d, bias=False) for _ in range(3))
        self.attn = SelfAttention(cfg)
        self.cross = CrossAttention(cfg)
        self.fc = nn.Linear(d, cfg.mlp_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_dim, d, bias=False)

    def forward(self, x, kv, mask=None, cache=None, causal=False):  # x [N, T, D]
        x = x + self.attn(self.ln1(x), mask, cache, causal)
        x = x + self.cross(self.ln2(x), kv)
        return x + self.proj(F.gelu(self.fc(self.ln3(x))))


class CaptionDecoder(nn.Module):
    """CapPa decoder. Autoregressive rows: inputs BOS + targets shifted right, causal attention.
    Parallel rows: inputs all [MASK], bidirectional attention over the row's real positions (masking ratio 1).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.img_proj = nn.Linear(cfg.encoder_width, d, bias=False) if cfg.encoder_width != d else nn.Identity()
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        # Cross-attention form in forward / loss: "auto" (cheaper one per batch length) | "kv" | "absorbed".
        self.cross_mode = "auto"
        self.register_buffer("causal", torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool).tril(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.pos_emb, std=0.02)
        for b in self.blocks:  # GPT-2: residual writes scaled so the stream's variance stays O(1) with depth
            for w in (b.attn.out.weight, b.cross.out.weight, b.proj.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * self.cfg.layers))
        # big_vision CapPa zero-initialises the logits layer: uniform first prediction, loss = ln V exactly.
        nn.init.zeros_(self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- shared pieces -------------------------------------------------------------------------
    def _image_tokens(self, features):  # [B, P, E] (fp16 store) -> [B, P, D] in the parameters' dtype
        return self.img_proj(features.to(self.pos_emb.dtype))

    def memory(self, features):
        """Image tokens -> per-layer cross-attention K/V, computed once per image. features [B, P, E]."""
        img = self._image_tokens(features)
        return [b.cross.memory(img) for b in self.blocks]

    def _train_memory(self, features, text_len: int):
        """What each layer's cross-attention reads in one pass over [B, T] text: `memory` (K/V tuples), or in
        the absorbed form the image tokens themselves (`CrossAttention.forward` dispatches on which)."""
        cross = self.cross_mode
        if cross == "auto":
            cross = "absorbed" if absorb_cross(text_len, features.shape[1], self.cfg) else "kv"
        if cross == "kv":
            return self.memory(features)
        if cross == "absorbed":
            return [self._image_tokens(features)] * len(self.blocks)
        raise ValueError(f"cross_mode must be auto, kv or absorbed, got {self.cross_mode!r}")

    def _hidden(self, tokens, kvs, mask=None, start=0, caches=None, causal=False):
        """tokens [N, T] at positions start.. -> final hidden states [N, T, D]."""
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb[start : start + t]  # [N, T, D]
        for i, b in enumerate(self.blocks):
            x = b(x, kvs[i], mask, None if caches is None else caches[i], causal)
        return self.ln_f(x)

    def _inputs(self, targets, target_mask, parallel):
        """The model's own inputs and per-row self-attention mask. -> tokens [B, L], mask [B, 1, L, L]."""
        b, l = targets.shape
        if l > self.cfg.max_len:
            raise ValueError(f"text length {l} > max_len {self.cfg.max_len}")
        parallel = torch.as_tensor(parallel, device=targets.device).expand(b)  # [B]
        bos = targets.new_full((b, 1), self.cfg.bos_id)
        ar_in = torch.cat([bos, targets[:, :-1]], dim=1)  # [B, L] shifted right
        tokens = torch.where(parallel[:, None], torch.full_like(targets, self.cfg.mask_id), ar_in)
        # Padded keys are masked, so logits do not depend on the batch's padding; key 0 always stays
        # visible so no query row is fully masked (SDPA would return NaN for it).
        key_ok = target_mask.clone()
        key_ok[:, 0] = True  # [B, L]
        allowed = self.causal[:l, :l] | parallel[:, None, None]  # [B, L, L]
        return tokens, (allowed & key_ok[:, None, :])[:, None]  # [B, 1, L, L]

    # ---- training --------------------------------------------------------------------------------
    def forward(self, features, targets, target_mask, parallel):
        """features [B, P, E], targets [B, L] int64, target_mask [B, L] bool, parallel [B] bool -> logits [B, L, V]."""
        tokens, mask = self._inputs(targets, target_mask, parallel)
        return self.head(self._hidden(tokens, self._train_memory(features, tokens.shape[1]), mask))

    def loss(self, features, targets, target_mask, parallel) -> dict:
        """Cross-entropy over real tokens (EOS included, padding excluded by the mask, never by id).

        The vocab head runs only on real positions (the padding's share of the D x V matmul is skipped).
        Returns tensors: loss = mean over ALL real tokens of the batch (so each token weighs the same,
        whichever mode its row drew); loss_ar / loss_par = mean over that mode's tokens (0 when a mode has
        none); tokens_ar / tokens_par = token counts (int64), for exact weighted averages across steps.
        """
        tokens, mask = self._inputs(targets, target_mask, parallel)
        h = self._hidden(tokens, self._train_memory(features, tokens.shape[1]), mask)  # [B, L, D]
        logits = self.head(h[target_mask])  # [T_real, V]
        ce = F.cross_entropy(logits.float(), targets[target_mask], reduction="none")  # [T_real]
        par = torch.as_tensor(parallel, device=targets.device).expand(targets.shape[0])
        is_par = par[:, None].expand_as(target_mask)[target_mask]  # [T_real]
        n_par = is_par.sum()
        n_ar = is_par.numel() - n_par
        sum_par = (ce * is_par).sum()
        sum_ar = ce.sum() - sum_par
        return {
            "loss": ce.mean(),
            "loss_ar": sum_ar / n_ar.clamp(min=1),
            "loss_par": sum_par / n_par.clamp(min=1),
            "tokens_ar": n_ar,
            "tokens_par": n_par,
        }

    @torch.no_grad()
    def score(self, features, targets, target_mask):
        """Summed AR log-likelihood of each caption -> [N] float32 (zero-shot ranking of candidates).

        features [B, P, E]; targets / target_mask [N, L] with N = B*C: rows i*C .. i*C+C-1 are the C
        candidate captions of image i (the image's K/V are shared, not copied).
        """
        n = targets.shape[0]
        if n % features.shape[0]:
            raise ValueError("targets rows must be a multiple of the images")
        tokens, mask = self._inputs(targets, target_mask, torch.zeros(n, dtype=torch.bool, device=targets.device))
        h = self._hidden(tokens, self.memory(features), mask)[target_mask]  # [T_real, D]: head on real tokens only
        nll = F.cross_entropy(self.head(h).float(), targets[target_mask], reduction="none")  # [T_real]
        row = torch.arange(n, device=targets.device)[:, None].expand_as(target_mask)[target_mask]  # [T_real]
        return torch.zeros(n, device=targets.device).index_add_(0, row, -nll)

    # ---- generation ------------------------------------------------------------------------------
    def _next_logp(self, h):  # [N, D] -> [N, V] float32 log-probs, [MASK] never generated
        logp = self.head(h).float()
        logp[:, self.cfg.mask_id] = -math.inf
        return logp.log_softmax(-1)

    @torch.no_grad()
    def generate(self, features, *, max_new_tokens: int, beam_size: int = 1, use_cache: bool = True):
        """Autoregressive captions -> ids [B, T], T <= max_new_tokens; rows padded with EOS after they end.

        use_cache=True: self-attention K/V appended per step, image K/V computed once per image.
        use_cache=False: the naive baseline, re-running the whole prefix (and image K/V) every step.
        Beam search keeps finished beams in the beam (extended by EOS at no cost) and returns the beam
        with the best length-normalised log-likelihood; beam_size=1 is exactly greedy.
        """
        if not 1 <= max_new_tokens <= self.cfg.max_len:
            raise ValueError(f"max_new_tokens must be in 1..{self.cfg.max_len}")
        if beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        b, k, eos, dev = features.shape[0], beam_size, self.cfg.eos_id, features.device
        n = b * k
        kvs = self.memory(features) if use_cache else None
        caches = [KVCache(max_new_tokens) for _ in self.blocks] if use_cache else None
        seq = torch.full((n, 1), self.cfg.bos_id, dtype=torch.long, device=dev)  # [N, 1+t] incl. BOS
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = -math.inf  # all beams start identical: let only the first one expand at step 0
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            if use_cache:
                h = self._hidden(seq[:, -1:], kvs, start=t, caches=caches)[:, -1]  # [N, D]
            else:
                h = self._hidden(seq, self.memory(features), causal=True)[:, -1]  # [N, D]
            logp = self._next_logp(h)  # [N, V]
            # Finished rows may only repeat EOS, at no cost.
            logp = torch.where(done[:, None], torch.full_like(logp, -math.inf), logp)
            logp[:, eos] = torch.where(done, torch.zeros_like(logp[:, eos]), logp[:, eos])
            # One code path for every beam size: with K = 1, top-1 over V is the greedy argmax.
            cand = (scores.view(n, 1) + logp).view(b, -1)  # [B, K*V]
            scores, idx = cand.topk(k, dim=-1)  # [B, K]
            tok = (idx % logp.shape[1]).view(n)  # [N]
            if k > 1:
                src = (torch.arange(b, device=dev)[:, None] * k + idx // logp.shape[1]).view(n)
                seq, done = seq[src], done[src]
                for c in caches or ():
                    c.reorder(src)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            done = done | (tok == eos)
            if bool(done.all()):
                break
        out = seq[:, 1:]  # [N, T]
        if k > 1:
            ended = (out == eos).cumsum(1) > 0
            length = (~ended).sum(1) + ended.any(1).long()  # tokens up to and incl. the first EOS
            best = (scores.view(n) / length.clamp(min=1)).view(b, k).argmax(1)  # [B]
            out = out.view(b, k, -1)[torch.arange(b, device=dev), best]
        return out

    @torch.no_grad()
    def parallel_decode(self, features, *, length=None, refine_steps: int = 0, max_length: int | None = None):
        """CapPa parallel decoding -> ids [B, L]: one all-[MASK] pass (argmax), then `refine_steps` passes.

        Parallel rows were trained to attend over exactly their real positions, so the row length is an
        input: `length` (int or [B] tensor, EOS included). length=None searches every length 1..max_length
        (default max_len) and keeps, per image, the one whose argmax caption has the best mean token
        log-probability: max_length passes, so pass a small max_length (e.g. 32) on a CPU.
        Refinement (mask-predict): pass s of S re-masks the n*(S-s+1)/(S+1) least confident tokens of a row
        and re-predicts them with the rest visible. The model never saw partly masked rows in training
        (masking ratio 1), so refinement is a comparison mode, not expected to help much.
        """
        b, dev = features.shape[0], features.device
        kvs = self.memory(features)
        if length is None:
            best_tok, best_score = None, None
            for n in range(1, (max_length or self.cfg.max_len) + 1):
                tok, conf = self._parallel(kvs, torch.full((b,), n, device=dev), refine_steps)
                s = conf[:, :n].mean(1)  # [B]
                if best_tok is None:
                    best_tok, best_score = tok, s
                else:
                    best_tok = F.pad(best_tok, (0, 1), value=self.cfg.eos_id)
                    better = s > best_score
                    best_tok = torch.where(better[:, None], tok, best_tok)
                    best_score = torch.maximum(s, best_score)
            return best_tok
        lengths = torch.as_tensor(length, device=dev).expand(b).long()
        return self._parallel(kvs, lengths, refine_steps)[0]

    def _parallel(self, kvs, lengths, refine_steps):
        """-> (tokens [B, L], log-prob of each chosen token [B, L]) for rows of the given lengths."""
        l = int(lengths.max())
        if not 1 <= l <= self.cfg.max_len or int(lengths.min()) < 1:
            raise ValueError(f"lengths must be in 1..{self.cfg.max_len}")
        real = torch.arange(l, device=lengths.device)[None] < lengths[:, None]  # [B, L]
        mask = (real[:, None, :] | ~real[:, :, None])[:, None]  # [B, 1, L, L]: real keys (pads see all)
        tokens = torch.full(real.shape, self.cfg.mask_id, dtype=torch.long, device=lengths.device)
        conf = torch.zeros(real.shape, device=lengths.device)
        for s in range(refine_steps + 1):
            h = self._hidden(tokens, kvs, mask)  # [B, L, D]
            logp = self._next_logp(h.flatten(0, 1)).view(*real.shape, -1)  # [B, L, V]
            new_conf, new_tok = logp.max(-1)  # [B, L]
            redo = tokens == self.cfg.mask_id
            tokens = torch.where(redo, new_tok, tokens)
            conf = torch.where(redo, new_conf, conf)
            if s == refine_steps:
                break
            n_mask = (lengths * (refine_steps - s) // (refine_steps + 1)).clamp(min=0)  # [B]
            rank = conf.masked_fill(~real, math.inf).argsort(1).argsort(1)  # 0 = least confident
            tokens = torch.where((rank < n_mask[:, None]) & real, self.cfg.mask_id, tokens)
        tokens = tokens.masked_fill(~real, self.cfg.eos_id)
        return tokens, conf.masked_fill(~real, 0.0)


def flops_per_sample(cfg: DecoderConfig, text_len: float, image_tokens: int, cross: str = "kv") -> dict:
    """Model FLOPs of one sample (a multiply-add = 2 FLOPs) -> {"forward": F, "train": forward + backward}.

    Forward, per layer: self-attn projections 2*L*4D^2; scores and weighted sum 2*2*L^2*D (the full L x L,
    as computed); cross-attn Q/out 2*L*2D^2; MLP 2*L*2*D*F; and the cross-attention to the image tokens,
    as `cross` computes it: "kv" = K/V of the image tokens 2*P*2D^2 plus scores and sum 2*2*L*P*D;
    "absorbed" (`CrossAttention.absorbed`) = the K/V weights applied on the text side 2*2*L*D^2 plus scores
    and sum over full-width image tokens per head 2*2*L*P*D*H. Plus the image projection 2*P*E*D when
    E != D, and the vocab head 2*L*D*V (the loss fast path runs it on real tokens only, so pass L = real
    tokens per row).
    Train: backward = 2x forward (input and weight gradients), except that the frozen, cached features
    need no gradient: the matmuls that read them directly skip that half of their backward ("kv": the image
    K/V when E == D, else the projection; "absorbed": the two image-token matmuls when E == D). So train =
    3*F - the skipped part. Embedding lookups, norms and softmax are not counted (they are not matmuls).
    """
    l, p, d, f, e = text_len, image_tokens, cfg.width, cfg.mlp_dim, cfg.encoder_width
    image_side, image_att = _cross_flops(cfg, l, p, cross)
    layer = 2 * l * 4 * d * d + 4 * l * l * d + 2 * l * 2 * d * d + image_side + image_att + 4 * l * d * f
    fwd = cfg.layers * layer + 2 * l * d * cfg.vocab_size
    if e != d:
        fwd += 2 * p * e * d
        no_input_grad = 2 * p * e * d
    else:
        no_input_grad = cfg.layers * image_side
    return {"forward": fwd, "train": 3 * fwd - no_input_grad}
