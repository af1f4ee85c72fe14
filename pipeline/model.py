"""CapPa caption decoder: pre-LN self-attn / cross-attn / MLP blocks over cached image tokens, AR + parallel modes.

Dimension letters used in shape comments:
  B: batch (images)            L: text length (tokens)      P: image tokens (patches, 197 for ViT-B/16)
  E: encoder (feature) width   D: decoder width             V: vocabulary (50,258 = GPT-2 + [MASK])
  H: attention heads           K: beams                     N: text rows (B, or B*K / B*C rows per image)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DecoderConfig  # the decoder's config lives with the other configs


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


class ImageKV(NamedTuple):
    """What a cross-attention layer reads in the standard form: the image tokens' keys and values, computed
    once per image (generation reuses them at every step)."""

    k: torch.Tensor  # [B, H, P, D/H]
    v: torch.Tensor  # [B, H, P, D/H]


class ImageTokens(NamedTuple):
    """What a cross-attention layer reads in the absorbed form: the (projected) image tokens themselves."""

    x: torch.Tensor  # [B, P, D]


# Memory of one layer's cross-attention: the form is the type.
ImageMemory = Union[ImageKV, ImageTokens]

# The absorbed form's batched matmuls and layout copies ran at ~60% of the rate of the standard form's large
# image K/V matmuls (CPU, fp32, 6 x 768 decoder, measured): "auto" takes it only when it wins after this
# discount. Another device sets its own (`CaptionDecoder.absorbed_discount`).
ABSORBED_DISCOUNT = 1.7


class CrossAttention(nn.Module):
    """Text queries attend to the image tokens, in one of two forms that compute the same function:

    - "kv" (`ImageKV` memory): K/V projections on the P image tokens, once per image.
    - "absorbed" (`ImageTokens` memory): per head, scores q_h (W_k,h img)^T = (q_h W_k,h) img^T and output
      A (img W_v,h^T) = (A img) W_v,h^T, so the D x D projections run on the T text tokens instead of the P
      image tokens, for an extra 2*T*P*D*H multiply-adds in the attention itself. Cheaper when T is short
      (training: a caption of ~20 tokens against 197 image tokens).
    `flops` is the cost model of both; `cheaper_form` picks one for a text length.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h = cfg.heads
        self.q = nn.Linear(cfg.width, cfg.width, bias=False)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)

    @staticmethod
    def flops(cfg: DecoderConfig, text_len: float, image_tokens: int, form: str) -> tuple[float, float]:
        """Forward FLOPs per layer of the part that differs between the two forms, as (matmuls that read the
        image tokens directly, the rest). "kv": image K/V 2*P*2D^2, scores and sum 2*2*L*P*D. "absorbed":
        scores and sum over full-width image tokens per head 2*2*L*P*D*H, K/V weights on the text side
        2*L*2D^2."""
        l, p, d, h = text_len, image_tokens, cfg.width, cfg.heads
        if form == "kv":
            return 2 * p * 2 * d * d, 4 * l * p * d
        if form == "absorbed":
            return 4 * l * p * d * h, 2 * l * 2 * d * d
        raise ValueError(f"cross-attention form must be kv or absorbed, got {form!r}")

    @staticmethod
    def cheaper_form(cfg: DecoderConfig, text_len: float, image_tokens: int,
                     absorbed_discount: float = ABSORBED_DISCOUNT) -> str:
        """"absorbed" when its FLOPs, weighted by `absorbed_discount`, are fewer than the "kv" form's, else
        "kv". At 6 x 768 with 197 image tokens and the CPU discount, absorbed wins up to T = 29 tokens."""
        absorbed = absorbed_discount * sum(CrossAttention.flops(cfg, text_len, image_tokens, "absorbed"))
        return "absorbed" if absorbed < sum(CrossAttention.flops(cfg, text_len, image_tokens, "kv")) else "kv"

    def memory(self, img) -> ImageKV:  # img [B, P, D]
        k, v = self.kv(img).chunk(2, dim=-1)
        return ImageKV(_heads(k, self.h), _heads(v, self.h))

    def forward(self, x, memory: ImageMemory):
        """x [N, T, D] (N = G rows per image), or [1, T, D]: one query row shared by all B images (parallel
        rows' first layer: their queries are computed once) -> [max(N, B), T, D]."""
        if isinstance(memory, ImageTokens):
            return self._absorbed(x, memory.x)
        k, v = memory  # [B, H, P, D/H]
        b, n, t = k.shape[0], x.shape[0], x.shape[1]
        g = n // b  # text rows per image (beams, candidate captions): stacked as extra queries, so
        q = _heads(self.q(x), self.h)  # [N, H, T, D/H]          the image K/V are never copied
        if n == 1 < b:
            q = q.expand(b, -1, -1, -1)  # [B, H, T, D/H]
        elif g > 1:
            q = q.view(b, g, self.h, t, -1).transpose(1, 2).reshape(b, self.h, g * t, -1)  # [B, H, G*T, D/H]
        y = F.scaled_dot_product_attention(q, k, v)
        if g > 1:
            y = y.view(b, self.h, g, t, -1).transpose(1, 2).reshape(n, self.h, t, -1)  # [N, H, T, D/H]
        return self.out(_merge(y))

    def _absorbed(self, x, img):
        """The absorbed form. x [B or 1, T, D], img [B, P, D] -> [B, T, D]."""
        n, t, d = x.shape
        b, p = img.shape[:2]
        h, hd = self.h, d // self.h
        wk, wv = self.kv.weight.view(2, h, hd, d).unbind(0)  # [H, D/H, D] each
        # Head-major [H, N*T, .] layouts, so the per-head weights are bmm operands as they are (no copies).
        q = (self.q(x) * hd**-0.5).view(n * t, h, hd).transpose(0, 1)  # [H, N*T, D/H]
        qk = torch.bmm(q, wk).view(h, n, t, d).transpose(0, 1).reshape(n, h * t, d)  # [N, H*T, D]
        if n == 1 < b:  # one shared query row: its scores against every image are one matmul
            s = (qk[0] @ img.reshape(b * p, d).T).view(h * t, b, p).transpose(0, 1)  # [B, H*T, P]
        else:
            s = torch.bmm(qk, img.transpose(1, 2))  # [B, H*T, P]
        att = torch.softmax(s, dim=-1)  # [B, H*T, P]
        y = torch.bmm(att, img).view(b, h, t, d).transpose(0, 1).reshape(h, b * t, d)  # [H, B*T, D]
        y = torch.bmm(y, wv.transpose(1, 2))  # [H, B*T, D/H]
        return self.out(y.transpose(0, 1).reshape(b, t, d))


@dataclass
class LossSums:
    """A batch's summed cross-entropy (nats, float32) and real-token count (int64) per mode: sums, so batches,
    ranks and log intervals add up exactly; the means are for reading."""

    sum_ar: torch.Tensor  # [] autoregressive rows
    tokens_ar: torch.Tensor  # []
    sum_par: torch.Tensor  # [] parallel rows
    tokens_par: torch.Tensor  # []

    @property
    def loss(self) -> torch.Tensor:
        """Mean over ALL real tokens of the batch, whichever mode their row drew."""
        return (self.sum_ar + self.sum_par) / (self.tokens_ar + self.tokens_par).clamp(min=1)

    @property
    def loss_ar(self) -> torch.Tensor:  # mean over the AR rows' tokens (0 when there are none)
        return self.sum_ar / self.tokens_ar.clamp(min=1)

    @property
    def loss_par(self) -> torch.Tensor:
        return self.sum_par / self.tokens_par.clamp(min=1)

    def detach(self) -> "LossSums":
        return LossSums(self.sum_ar.detach(), self.tokens_ar, self.sum_par.detach(), self.tokens_par)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.width
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(d, bias=False) for _ in range(3))
        self.attn = SelfAttention(cfg)
        self.cross = CrossAttention(cfg)
        self.fc = nn.Linear(d, cfg.mlp_dim, bias=False)
        self.proj = nn.Linear(cfg.mlp_dim, d, bias=False)

    def forward(self, x, memory: ImageMemory, mask=None, cache=None, causal=False):  # x [N, T, D]
        x = x + self.attn(self.ln1(x), mask, cache, causal)
        x = x + self.cross(self.ln2(x), memory)
        return x + self.proj(F.gelu(self.fc(self.ln3(x))))


class CaptionDecoder(nn.Module):
    """CapPa decoder. Autoregressive rows: inputs BOS + targets shifted right, causal attention, padded keys
    masked (a row's logits never depend on the batch's padding).
    Parallel rows (big_vision's masking ratio 1): inputs [MASK] at every position 0..Lp-1 for one fixed
    length Lp = `parallel_len`, full attention over all Lp positions, loss on the caption's real tokens only.
    Nothing tells the model the caption's length: it must predict where EOS goes, so a parallel row's logits
    are a function of the image alone.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        if not 1 <= self.parallel_len <= cfg.max_len:
            raise ValueError(f"parallel_len must be in 1..max_len={cfg.max_len}, got {cfg.parallel_len}")
        self.img_proj = nn.Linear(cfg.encoder_width, d, bias=False) if cfg.encoder_width != d else nn.Identity()
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, d))
        self.img_pos_emb = nn.Parameter(torch.zeros(cfg.image_positions, d)) if cfg.image_positions else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # [V, D], one matrix
        # Which cross-attention form training passes (`loss`, `logits`) run: "auto" = the cheaper one for each
        # sub-pass's text length (`CrossAttention.cheaper_form`, weighted by `absorbed_discount`) | "kv" |
        # "absorbed". Generation and `score` always use "kv": their image K/V are reused across steps / rows.
        self.cross_attention = "auto"
        self.absorbed_discount = ABSORBED_DISCOUNT
        self.register_buffer("causal", torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool).tril(), persistent=False)
        self.reset_parameters()

    @property
    def parallel_len(self) -> int:
        return self.cfg.parallel_len or self.cfg.max_len

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.img_pos_emb is not None:
            nn.init.normal_(self.img_pos_emb, std=0.02)
        for b in self.blocks:  # GPT-2: residual writes scaled so the stream's variance stays O(1) with depth
            for w in (b.attn.out.weight, b.cross.out.weight, b.proj.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * self.cfg.layers))
        # big_vision CapPa zero-initialises the logits layer: uniform first prediction, loss = ln V exactly.
        # A tied one is the embedding matrix and keeps its N(0, 0.02) init (near-uniform first prediction).
        if not self.cfg.tie_embeddings:
            nn.init.zeros_(self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- shared pieces -------------------------------------------------------------------------
    def _image_tokens(self, features):  # [B, P, E] (fp16 store) -> [B, P, D] in the parameters' dtype
        img = self.img_proj(features.to(self.pos_emb.dtype))
        if self.img_pos_emb is None:
            return img
        if img.shape[1] != self.img_pos_emb.shape[0]:
            raise ValueError(f"{img.shape[1]} image tokens, but the decoder has positions for {self.img_pos_emb.shape[0]}")
        return img + self.img_pos_emb  # [B, P, D]

    def memory(self, features) -> list[ImageKV]:
        """Image tokens -> per-layer cross-attention K/V, computed once per image. features [B, P, E]."""
        img = self._image_tokens(features)
        return [b.cross.memory(img) for b in self.blocks]

    def cross_form(self, text_len: int, image_tokens: int) -> str:
        """The cross-attention form a training pass over text of `text_len` runs ("kv" or "absorbed")."""
        if self.cross_attention == "auto":
            return CrossAttention.cheaper_form(self.cfg, text_len, image_tokens, self.absorbed_discount)
        if self.cross_attention in ("kv", "absorbed"):
            return self.cross_attention
        raise ValueError(f"cross_attention must be auto, kv or absorbed, got {self.cross_attention!r}")

    def _train_memory(self, features, text_len: int) -> list[ImageMemory]:
        """Each layer's cross-attention memory for one training pass over [B, text_len] text, in `cross_form`."""
        if self.cross_form(text_len, features.shape[1]) == "kv":
            return self.memory(features)
        return [ImageTokens(self._image_tokens(features))] * len(self.blocks)

    def _hidden(self, tokens, memory, mask=None, start=0, caches=None, causal=False):
        """tokens [N, T] at positions start.. -> final hidden states [N, T, D] (mask None: full attention)."""
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb[start : start + t]  # [N, T, D]
        for i, b in enumerate(self.blocks):
            x = b(x, memory[i], mask, None if caches is None else caches[i], causal)
        return self.ln_f(x)

    def _parallel_hidden(self, memory):
        """All-[MASK] rows of length Lp against the images of `memory` -> [B, Lp, D].

        Every parallel row enters the first block as the same [MASK] + position embeddings, so block 0's
        self-attention (and its cross-attention queries) run once on one [1, Lp, D] row; the row fans out
        to the B images in block 0's cross-attention. Same function as `_hidden` on [MASK] tokens.
        """
        lp = self.parallel_len
        x = (self.tok_emb.weight[self.cfg.mask_id] + self.pos_emb[:lp])[None]  # [1, Lp, D]
        for i, b in enumerate(self.blocks):
            x = b(x, memory[i])  # block 0: [1, Lp, D] -> [B, Lp, D]
        return self.ln_f(x)

    def _ar_inputs(self, targets, target_mask):
        """AR rows' inputs and self-attention mask. -> tokens [B, L], mask [B, 1, L, L]."""
        b, l = targets.shape
        if l > self.cfg.max_len:
            raise ValueError(f"text length {l} > max_len {self.cfg.max_len}")
        tokens = torch.cat([targets.new_full((b, 1), self.cfg.bos_id), targets[:, :-1]], dim=1)  # shifted right
        # Padded keys are masked, so logits do not depend on the batch's padding; key 0 always stays
        # visible so no query row is fully masked (SDPA would return NaN for it).
        key_ok = target_mask.clone()
        key_ok[:, 0] = True  # [B, L]
        return tokens, (self.causal[:l, :l] & key_ok[:, None, :])[:, None]  # [B, 1, L, L]

    def _ar_hidden(self, features, targets, target_mask):  # -> [B, L, D]
        tokens, mask = self._ar_inputs(targets, target_mask)
        return self._hidden(tokens, self._train_memory(features, tokens.shape[1]), mask)

    def _split(self, parallel, b: int):
        """parallel flags -> (AR row indices, parallel row indices), on the CPU (one device read of B flags)."""
        flags = torch.as_tensor(parallel).to("cpu", torch.bool).expand(b)
        return (~flags).nonzero()[:, 0], flags.nonzero()[:, 0]

    def _fit(self, targets, target_mask):
        """Parallel rows' targets / mask cut or padded (mask False) to Lp columns -> [B, Lp] each."""
        lp, l = self.parallel_len, targets.shape[1]
        if l >= lp:
            return targets[:, :lp], target_mask[:, :lp]
        return F.pad(targets, (0, lp - l), value=self.cfg.eos_id), F.pad(target_mask, (0, lp - l))

    # ---- training --------------------------------------------------------------------------------
    def forward(self, features, targets, target_mask, parallel) -> "LossSums":
        """The training loss (`loss`): what DDP and torch.compile wrap."""
        return self.loss(features, targets, target_mask, parallel)

    def logits(self, features, targets, target_mask, parallel):
        """features [B, P, E], targets [B, L] int64, target_mask [B, L] bool, parallel [B] bool -> [B, L, V].

        A parallel row's logits come from its Lp-long all-[MASK] pass: columns >= Lp (longer batches) have
        no prediction and are 0 (a uniform distribution).
        """
        b, l = targets.shape
        ar, par = self._split(parallel, b)
        out = self.head.weight.new_zeros(b, l, self.cfg.vocab_size)  # [B, L, V]
        if len(ar):
            i = ar.to(targets.device)
            out[i] = self.head(self._ar_hidden(features[i], targets[i], target_mask[i])).to(out.dtype)
        if len(par):
            i, w = par.to(targets.device), min(l, self.parallel_len)
            h = self._parallel_hidden(self._train_memory(features[i], self.parallel_len))  # [Bp, Lp, D]
            out[i, :w] = self.head(h[:, :w]).to(out.dtype)
        return out

    def loss(self, features, targets, target_mask, parallel) -> "LossSums":
        """Summed cross-entropy over real tokens (EOS included, padding excluded by the mask, never by id) and
        the token counts, per mode.

        AR rows and parallel rows run as two sub-passes: the AR rows at the batch's length L, the parallel
        rows at Lp. A parallel row scores its caption's first Lp tokens (all of them when Lp is the longest
        training caption). The vocab head runs once per batch, on both modes' real positions only.
        """
        b = targets.shape[0]
        real_h, real_t = {}, {}  # mode -> [T_mode, D], [T_mode]: each present mode's real tokens
        for mode, idx in zip(("ar", "par"), self._split(parallel, b)):
            if len(idx) == 0:
                continue
            whole = len(idx) == b  # a one-mode batch needs no row gather
            i = idx.to(targets.device)
            f, t, m = (features, targets, target_mask) if whole else (features[i], targets[i], target_mask[i])
            if mode == "ar":
                h = self._ar_hidden(f, t, m)  # [Ba, L, D]
            else:
                t, m = self._fit(t, m)
                h = self._parallel_hidden(self._train_memory(f, self.parallel_len))  # [Bp, Lp, D]
            real_h[mode], real_t[mode] = h[m], t[m]
        # One head over both modes' real tokens: one [V, D] weight gradient per step, not one per mode.
        logits = self.head(torch.cat(list(real_h.values())))  # [T_ar + T_par, V]
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                             torch.cat(list(real_t.values())), reduction="none")  # [T_ar + T_par]
        per_mode = dict(zip(real_t, ce.split([len(t) for t in real_t.values()])))
        none = ce[:0]  # a mode with no rows: sum 0, 0 tokens
        sums = {mode: per_mode.get(mode, none).sum() for mode in ("ar", "par")}
        counts = {mode: torch.tensor(len(per_mode.get(mode, none)), device=targets.device) for mode in ("ar", "par")}
        return LossSums(sums["ar"], counts["ar"], sums["par"], counts["par"])

    @torch.no_grad()
    def score(self, features, targets, target_mask):
        """Summed AR log-likelihood of each caption -> [N] float32 (zero-shot ranking of candidates).

        features [B, P, E]; targets / target_mask [N, L] with N = B*C: rows i*C .. i*C+C-1 are the C
        candidate captions of image i (the image's K/V are shared, not copied).
        """
        n = targets.shape[0]
        if n % features.shape[0]:
            raise ValueError("targets rows must be a multiple of the images")
        tokens, mask = self._ar_inputs(targets, target_mask)
        h = self._hidden(tokens, self.memory(features), mask)[target_mask]  # [T_real, D]: head on real tokens only
        nll = F.cross_entropy(self.head(h).float(), targets[target_mask], reduction="none")  # [T_real]
        row = torch.arange(n, device=targets.device)[:, None].expand_as(target_mask)[target_mask]  # [T_real]
        return torch.zeros(n, device=targets.device).index_add_(0, row, -nll)

    # ---- generation (pipeline/decoding.py) ------------------------------------------------------
    def _next_logp(self, h):  # [N, D] -> [N, V] float32 log-probs, [MASK] never generated
        logp = self.head(h).float()
        logp[:, self.cfg.mask_id] = -math.inf
        return logp.log_softmax(-1)

    @torch.no_grad()
    def generate(self, features, *, max_new_tokens: int, beam_size: int = 1, length_penalty: float = 1.0,
                 use_cache: bool = True):
        """Autoregressive captions -> ids [B, T], T <= max_new_tokens; rows padded with EOS after they end.

        beam_size=1: greedy. Else beam search (`decoding.beam_search`): K alive hypotheses per image,
        finished ones kept in a pool of the best K, ranked by summed log-prob / length**length_penalty.
        use_cache=False re-runs the whole prefix (and image K/V) every step: the naive baseline.
        """
        from pipeline import decoding

        if beam_size == 1:
            return decoding.greedy(self, features, max_new_tokens=max_new_tokens, use_cache=use_cache)
        return decoding.beam_search(self, features, max_new_tokens=max_new_tokens, beam_size=beam_size,
                                    length_penalty=length_penalty, use_cache=use_cache).best()

    @torch.no_grad()
    def parallel_decode(self, features, *, refine_steps: int = 0):
        """CapPa parallel decoding -> ids [B, T], T <= Lp: one all-[MASK] pass at Lp (+ refine_steps
        mask-predict passes), each row cut at its first EOS (EOS padding after it). `decoding.parallel`."""
        from pipeline import decoding

        return decoding.parallel(self, features, refine_steps=refine_steps)


def flops_per_sample(cfg: DecoderConfig, text_len: float, image_tokens: int, cross: str = "kv", *,
                     parallel: bool = False) -> dict:
    """Model FLOPs of one sample (a multiply-add = 2 FLOPs) -> {"forward": F, "train": forward + backward}.

    Forward, per layer over S positions: self-attn projections 2*S*4D^2; scores and weighted sum 2*2*S^2*D
    (the full S x S, as computed); cross-attn Q/out 2*S*2D^2; MLP 2*S*2*D*F; and the cross-attention to the
    image tokens, as `cross` computes it: "kv" = K/V of the image tokens 2*P*2D^2 plus scores and sum
    2*2*S*P*D; "absorbed" (`CrossAttention`, absorbed form) = the K/V weights applied on the text side 2*2*S*D^2
    plus scores and sum over full-width image tokens per head 2*2*S*P*D*H. Plus the image projection
    2*P*E*D when E != D, and the vocab head 2*L*D*V on the L = `text_len` real tokens (the loss runs it on
    real tokens only). An AR row has S = L. A parallel row has S = Lp, and its block 0 leaves out what all
    parallel rows of a batch share (self-attention, cross-attention Q, and in the absorbed form Q W_k):
    `parallel_shared_flops` counts that once per batch.
    Train: backward = 2x forward (input and weight gradients), except that the frozen, cached features
    need no gradient: the matmuls that read them directly skip that half of their backward ("kv": the image
    K/V when E == D, else the projection; "absorbed": the two image-token matmuls when E == D). So train =
    3*F - the skipped part. Embedding lookups, norms and softmax are not counted (they are not matmuls).
    """
    l, p, d, f, e = text_len, image_tokens, cfg.width, cfg.mlp_dim, cfg.encoder_width
    s = (cfg.parallel_len or cfg.max_len) if parallel else l
    image_side, image_att = CrossAttention.flops(cfg, s, p, cross)
    layer = 2 * s * 4 * d * d + 4 * s * s * d + 2 * s * 2 * d * d + image_side + image_att + 4 * s * d * f
    fwd = cfg.layers * layer + 2 * l * d * cfg.vocab_size
    if parallel:
        fwd -= parallel_shared_flops(cfg, cross)["forward"]
    if e != d:
        fwd += 2 * p * e * d
        no_input_grad = 2 * p * e * d
    else:
        no_input_grad = cfg.layers * image_side
    return {"forward": fwd, "train": 3 * fwd - no_input_grad}


def parallel_shared_flops(cfg: DecoderConfig, cross: str = "kv") -> dict:
    """FLOPs of block 0's part that every parallel row shares, run once per batch on one [1, Lp, D] row:
    self-attention 2*S*4D^2 + 2*2*S^2*D, cross-attention Q 2*S*D^2, and in the absorbed form Q W_k 2*S*D^2
    (S = Lp). -> {"forward", "train"} (train = 3x: its input, the embeddings, needs gradients too)."""
    s, d = cfg.parallel_len or cfg.max_len, cfg.width
    fwd = 2 * s * 4 * d * d + 4 * s * s * d + 2 * s * d * d + (2 * s * d * d if cross == "absorbed" else 0)
    return {"forward": fwd, "train": 3 * fwd}
