"""The CapPa caption decoder network: pre-LN self-attention / cross-attention / MLP blocks over
cached image tokens, and the vocab head. The objective is pipeline/objective.py, decoding
pipeline/decoding.py, the cost model pipeline/cost.py.

Dimension letters used in shape comments:
  B: batch (images)           L: text length (tokens)   P: image tokens (patches, 197 for ViT-B/16)
  E: encoder (feature) width  D: decoder width          V: vocabulary (50,258 = GPT-2 + [MASK])
  H: attention heads          K: beams                  N: text rows (B, or B*K / B*C per image)
  Lp: the parallel rows' length
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import cost
from pipeline.config import DecoderConfig  # the decoder's config lives with the other configs

if TYPE_CHECKING:
    from pipeline.decoding import Beams, KVCache  # noqa: F401
    from pipeline.objective import LossSums


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
    """What a cross-attention layer reads in the standard form: the image tokens' keys and values,
    computed once per image (generation reuses them at every step)."""

    k: torch.Tensor  # [B, H, P, D/H]
    v: torch.Tensor  # [B, H, P, D/H]


class ImageTokens(NamedTuple):
    """What a cross-attention layer reads in the absorbed form: the (projected) image tokens
    themselves."""

    x: torch.Tensor  # [B, P, D]


# Memory of one layer's cross-attention: the form is the type.
ImageMemory = Union[ImageKV, ImageTokens]


class CrossAttention(nn.Module):
    """Text queries attend to the image tokens, in one of two forms that compute the same function:

    - "kv" (`ImageKV` memory): K/V projections on the P image tokens, once per image.
    - "absorbed" (`ImageTokens` memory): per head, scores q_h (W_k,h img)^T = (q_h W_k,h) img^T and
      output A (img W_v,h^T) = (A img) W_v,h^T, so the D x D projections run on the T text tokens
      instead of the P image tokens, for an extra 2*T*P*D*H multiply-adds in the attention itself.
      Cheaper when T is short (training: a caption of ~20 tokens against 197 image tokens).
    pipeline/cost.py counts both forms' FLOPs and picks the cheaper one for a text length.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h = cfg.heads
        self.q = nn.Linear(cfg.width, cfg.width, bias=False)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)

    def memory(self, img) -> ImageKV:  # img [B, P, D]
        k, v = self.kv(img).chunk(2, dim=-1)
        return ImageKV(_heads(k, self.h), _heads(v, self.h))

    def forward(self, x, memory: ImageMemory):
        """x [N, T, D] (N = G rows per image), or [1, T, D]: one query row shared by all B images
        (parallel rows' first layer: their queries are computed once) -> [max(N, B), T, D]."""
        if isinstance(memory, ImageTokens):
            return self._absorbed(x, memory.x)
        k, v = memory  # [B, H, P, D/H]
        b, n, t = k.shape[0], x.shape[0], x.shape[1]
        g = n // b  # text rows per image (beams, candidate captions): stacked as extra queries, so
        q = _heads(self.q(x), self.h)  # [N, H, T, D/H]          the image K/V are never copied
        if n == 1 < b:
            q = q.expand(b, -1, -1, -1)  # [B, H, T, D/H]
        elif g > 1:
            q = q.view(b, g, self.h, t, -1).transpose(1, 2)  # [B, H, G, T, D/H]
            q = q.reshape(b, self.h, g * t, -1)  # [B, H, G*T, D/H]
        y = F.scaled_dot_product_attention(q, k, v)
        if g > 1:
            y = y.view(b, self.h, g, t, -1).transpose(1, 2)  # [B, G, H, T, D/H]
            y = y.reshape(n, self.h, t, -1)  # [N, H, T, D/H]
        return self.out(_merge(y))

    def _absorbed(self, x, img):
        """The absorbed form. x [B or 1, T, D], img [B, P, D] -> [B, T, D]."""
        n, t, d = x.shape
        b, p = img.shape[:2]
        h, hd = self.h, d // self.h
        wk, wv = self.kv.weight.view(2, h, hd, d).unbind(0)  # [H, D/H, D] each
        # Head-major [H, N*T, .] layouts, so the per-head weights are bmm operands as they are (no
        # copies).
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
    """The CapPa decoder: `hidden` runs text rows against an image memory, `parallel_hidden` the
    all-[MASK] rows, `head` turns hidden states into logits. Which rows exist and what they score is
    pipeline/objective.py; `forward` is its loss, the call DDP and torch.compile wrap."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        if not 1 <= self.parallel_len <= cfg.max_len:
            raise ValueError(f"parallel_len must be in 1..max_len={cfg.max_len}, "
                             f"got {cfg.parallel_len}")
        enc = cfg.encoder_width
        self.img_proj = nn.Linear(enc, d, bias=False) if enc != d else nn.Identity()
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, d))
        if cfg.image_pos_emb and not cfg.image_tokens:
            raise ValueError("image_pos_emb needs image_tokens (the P of the features)")
        p = cfg.image_tokens if cfg.image_pos_emb else None
        self.img_pos_emb = nn.Parameter(torch.zeros(p, d)) if p else None  # [P, D]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # [V, D], one matrix
        # Which cross-attention form the passes of `pass_memory` run: "auto" = the cheaper one for
        # each pass's text length (`cost.cheaper_form`, weighted by `absorbed_discount`) | "kv" |
        # "absorbed". Generation and scoring use `memory` ("kv"): their image K/V are reused across
        # steps / rows.
        self.cross_attention = "auto"
        self.absorbed_discount = cost.ABSORBED_DISCOUNT
        causal = torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool).tril()  # [L, L]
        self.register_buffer("causal", causal, persistent=False)
        self.reset_parameters()

    @property
    def parallel_len(self) -> int:  # Lp: the all-[MASK] rows' length
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
        # GPT-2: residual writes scaled so the stream's variance stays O(1) with depth
        for b in self.blocks:
            for w in (b.attn.out.weight, b.cross.out.weight, b.proj.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * self.cfg.layers))
        # big_vision CapPa zero-initialises the logits layer: uniform first prediction, loss = ln V
        # exactly. A tied one is the embedding matrix and keeps its N(0, 0.02) init (near-uniform
        # first prediction).
        if not self.cfg.tie_embeddings:
            nn.init.zeros_(self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- the image side --------------------------------------------------------------------------
    def image_tokens(self, features):
        """features [B, P, E] (fp16 store) -> image tokens [B, P, D] in the parameters' dtype."""
        img = self.img_proj(features.to(self.pos_emb.dtype))
        if self.img_pos_emb is None:
            return img
        if img.shape[1] != self.img_pos_emb.shape[0]:
            raise ValueError(f"{img.shape[1]} image tokens, but the decoder has positions for "
                             f"{self.img_pos_emb.shape[0]}")
        return img + self.img_pos_emb  # [B, P, D]

    def memory(self, features) -> list[ImageKV]:
        """features [B, P, E] -> per-layer cross-attention K/V ("kv" form), computed once per
        image."""
        img = self.image_tokens(features)
        return [b.cross.memory(img) for b in self.blocks]

    def cross_form(self, text_len: int, image_tokens: int) -> str:
        """The cross-attention form a pass over text of `text_len` runs ("kv" or "absorbed")."""
        if self.cross_attention == "auto":
            return cost.cheaper_form(self.cfg, text_len, image_tokens, self.absorbed_discount)
        if self.cross_attention in ("kv", "absorbed"):
            return self.cross_attention
        raise ValueError(f"cross_attention must be auto, kv or absorbed, "
                         f"got {self.cross_attention!r}")

    def pass_memory(self, features, text_len: int) -> list[ImageMemory]:
        """Each layer's cross-attention memory for one pass over [B, text_len] text, in
        `cross_form`."""
        if self.cross_form(text_len, features.shape[1]) == "kv":
            return self.memory(features)
        return [ImageTokens(self.image_tokens(features))] * len(self.blocks)

    # ---- the text side ---------------------------------------------------------------------------
    def hidden(self, tokens, memory: list[ImageMemory], mask=None, start: int = 0,
               caches: list[KVCache] | None = None, causal: bool = False):
        """tokens [N, T] at positions start.. -> final hidden states [N, T, D].

        mask [N, 1, T, S] bool (None: full attention, or causal=True); caches: one per block,
        appended to (generation feeds one new token per call at position `start`)."""
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb[start : start + t]  # [N, T, D]
        for i, b in enumerate(self.blocks):
            x = b(x, memory[i], mask, None if caches is None else caches[i], causal)
        return self.ln_f(x)

    def parallel_hidden(self, memory: list[ImageMemory]):
        """All-[MASK] rows of length Lp against the images of `memory` -> [B, Lp, D].

        Every such row enters the first block as the same [MASK] + position embeddings, so block 0's
        self-attention (and its cross-attention queries) run once on one [1, Lp, D] row; the row
        fans out to the B images in block 0's cross-attention. Same function as `hidden` on [MASK]
        tokens.
        """
        lp = self.parallel_len
        x = (self.tok_emb.weight[self.cfg.mask_id] + self.pos_emb[:lp])[None]  # [1, Lp, D]
        for i, b in enumerate(self.blocks):
            x = b(x, memory[i])  # block 0: [1, Lp, D] -> [B, Lp, D]
        return self.ln_f(x)

    # ---- the interface: training (pipeline/objective.py) and decoding (pipeline/decoding.py) -----
    def forward(self, features, targets, target_mask, parallel) -> LossSums:
        """The training loss sums (`objective.loss_sums`): what DDP and torch.compile wrap."""
        from pipeline import objective

        return objective.loss_sums(self, features, targets, target_mask, parallel)

    def loss(self, features, targets, target_mask, parallel) -> LossSums:
        """features [B, P, E], targets / target_mask [B, L], parallel [B] bool ->
        `objective.LossSums`."""
        from pipeline import objective

        return objective.loss_sums(self, features, targets, target_mask, parallel)

    def logits(self, features, targets, target_mask, parallel):
        """features [B, P, E], targets [B, L] int64, target_mask [B, L] bool, parallel [B] bool ->
        [B, L, V] (`objective.logits`: a parallel row's columns >= Lp are 0)."""
        from pipeline import objective

        return objective.logits(self, features, targets, target_mask, parallel)

    @torch.no_grad()
    def score(self, features, targets, target_mask):
        """Summed AR log-likelihood of each caption -> [N] float32; targets [N, L], N = B*C
        candidates (rows i*C .. i*C+C-1 belong to image i). `decoding.score`."""
        from pipeline import decoding

        return decoding.score(self, features, targets, target_mask)

    @torch.no_grad()
    def generate(self, features, *, max_new_tokens: int, beam_size: int = 1,
                 length_penalty: float = 1.0, use_cache: bool = True):
        """Autoregressive captions -> ids [B, T], T <= max_new_tokens, EOS-padded after a row ends.
        beam_size=1: greedy, else beam search; use_cache=False re-runs the whole prefix every step.
        `decoding.generate`."""
        from pipeline import decoding

        return decoding.generate(self, features, max_new_tokens=max_new_tokens, beam_size=beam_size,
                                 length_penalty=length_penalty, use_cache=use_cache)

    @torch.no_grad()
    def parallel_decode(self, features, *, refine_steps: int = 0):
        """CapPa parallel decoding -> ids [B, T], T <= Lp: one all-[MASK] pass (+ refine_steps
        mask-predict passes), each row cut at its first EOS. `decoding.parallel`."""
        from pipeline import decoding

        return decoding.parallel(self, features, refine_steps=refine_steps)
