"""The decoder's cost model: FLOPs per sample in both cross-attention forms, and the form a pass
should run.

Letters as in pipeline/model.py (L text length, P image tokens, D width, E encoder width, H heads, F
MLP hidden size, V vocabulary, Lp the parallel rows' length). A multiply-add counts 2 FLOPs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import DecoderConfig

# The absorbed form's batched matmuls and layout copies ran at ~60% of the rate of the standard
# form's large image K/V matmuls (CPU, fp32, 6 x 768 decoder, measured): "auto" takes it only when
# it wins after this discount. Another device sets its own (`CaptionDecoder.absorbed_discount`).
ABSORBED_DISCOUNT = 1.7


def cross_attention_flops(cfg: DecoderConfig, text_len: float, image_tokens: int,
                          form: str) -> tuple[float, float]:
    """Forward FLOPs per layer of the part that differs between the two cross-attention forms, as
    (matmuls that read the image tokens directly, the rest). "kv": image K/V 2*P*2D^2, scores and
    sum 2*2*L*P*D. "absorbed": scores and sum over full-width image tokens per head 2*2*L*P*D*H, K/V
    weights on the text side 2*L*2D^2."""
    l, p, d, h = text_len, image_tokens, cfg.width, cfg.heads
    if form == "kv":
        return 2 * p * 2 * d * d, 4 * l * p * d
    if form == "absorbed":
        return 4 * l * p * d * h, 2 * l * 2 * d * d
    raise ValueError(f"cross-attention form must be kv or absorbed, got {form!r}")


def cheaper_form(cfg: DecoderConfig, text_len: float, image_tokens: int,
                 absorbed_discount: float = ABSORBED_DISCOUNT) -> str:
    """"absorbed" when its FLOPs, weighted by `absorbed_discount`, are fewer than the "kv" form's,
    else "kv". At 6 x 768 with 197 image tokens and the CPU discount, absorbed wins up to L = 29
    tokens."""
    kv = sum(cross_attention_flops(cfg, text_len, image_tokens, "kv"))
    absorbed = sum(cross_attention_flops(cfg, text_len, image_tokens, "absorbed"))
    absorbed *= absorbed_discount
    return "absorbed" if absorbed < kv else "kv"


def flops_per_sample(cfg: DecoderConfig, text_len: float, image_tokens: int, cross: str = "kv", *,
                     parallel: bool = False) -> dict:
    """Model FLOPs of one sample -> {"forward": F, "train": forward + backward}.

    Forward, per layer over S positions: self-attn projections 2*S*4D^2; scores and weighted sum
    2*2*S^2*D (the full S x S, as computed); cross-attn Q/out 2*S*2D^2; MLP 2*S*2*D*F; and the
    cross-attention to the image tokens as `cross` computes it (`cross_attention_flops`). Plus the
    image projection 2*P*E*D when E != D, and the vocab head 2*L*D*V on the L = `text_len` real
    tokens (the loss runs it on real tokens only). An AR row has S = L. A parallel row has S = Lp,
    and its block 0 leaves out what all parallel rows of a batch share: `parallel_shared_flops`
    counts that once per batch.
    Train: backward = 2x forward (input and weight gradients), except that the frozen, cached
    features need no gradient: the matmuls that read them directly skip that half of their backward
    ("kv": the image K/V when E == D, else the projection; "absorbed": the two image-token matmuls
    when E == D). So train = 3*F - the skipped part. Embedding lookups, norms and softmax are not
    counted (not matmuls).
    """
    l, p, d, f, e = text_len, image_tokens, cfg.width, cfg.mlp_dim, cfg.encoder_width
    s = (cfg.parallel_len or cfg.max_len) if parallel else l
    image_side, image_att = cross_attention_flops(cfg, s, p, cross)
    layer = (2 * s * 4 * d * d + 4 * s * s * d + 2 * s * 2 * d * d + image_side + image_att
             + 4 * s * d * f)
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
    """FLOPs of block 0's part that every parallel row shares, run once per batch on one [1, Lp, D]
    row: self-attention 2*S*4D^2 + 2*2*S^2*D, cross-attention Q 2*S*D^2, and in the absorbed form Q
    W_k 2*S*D^2 (S = Lp). -> {"forward", "train"} (train = 3x: its input, the embeddings, needs
    gradients too)."""
    s, d = cfg.parallel_len or cfg.max_len, cfg.width
    absorbed_q = 2 * s * d * d if cross == "absorbed" else 0
    fwd = 2 * s * 4 * d * d + 4 * s * s * d + 2 * s * d * d + absorbed_q
    return {"forward": fwd, "train": 3 * fwd}
