"""The `pipeline` command: each subcommand builds a config and calls one stage's `run(cfg)`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import (
    BenchConfig,
    CaptionConfig,
    EncodeConfig,
    EvalConfig,
    FetchConfig,
    StatusConfig,
    TrainConfig,
)
from pipeline.errors import Interrupted, UserError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home on import

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Pay the encoder once: fetch -> encode (frozen ViT, zarr cache) -> train a CapPa decoder -> eval.",
)


def Opt(help: str, *names: str):  # noqa: N802 - reads like typer.Option
    return typer.Option(*names, help=help)


@app.command()
def fetch(
    source: Annotated[str, Opt("'synthetic' (offline default) or a url list: headerless CC3M TSV, TSV/CSV with header, parquet")] = FetchConfig.source,
    count: Annotated[int, Opt("rows to take (synthetic: rows generated)")] = FetchConfig.count,
    shards: Annotated[Path, Opt("output folder for WebDataset shards")] = FetchConfig.shards,
    processes: Annotated[int, Opt("img2dataset processes")] = FetchConfig.processes,
    threads: Annotated[int, Opt("img2dataset download threads per process")] = FetchConfig.threads,
    seed: Annotated[int, Opt("seed of the synthetic data set")] = FetchConfig.seed,
    distributor: Annotated[str, Opt("img2dataset distributor: multiprocessing | pyspark | ray")] = FetchConfig.distributor,
    broken_fraction: Annotated[float, Opt("synthetic only: share of rows broken on purpose")] = FetchConfig.broken_fraction,
    samples_per_shard: Annotated[int, Opt("samples per WebDataset shard")] = FetchConfig.samples_per_shard,
):
    """Download a (caption, url) list into WebDataset shards with img2dataset."""
    from stages import fetch as stage

    stage.run(FetchConfig(source=source, count=count, shards=shards, processes=processes, threads=threads,
                          seed=seed, distributor=distributor, broken_fraction=broken_fraction,
                          samples_per_shard=samples_per_shard))


@app.command()
def encode(
    shards: Annotated[Path, Opt("folder of WebDataset shards")] = EncodeConfig.shards,
    store: Annotated[Path, Opt("zarr feature store to fill")] = EncodeConfig.store,
    model: Annotated[str, Opt("timm ViT name, e.g. vit_tiny_patch16_224 for tests")] = EncodeConfig.model,
    weights: Annotated[str, Opt("auto | hub | random | PATH (safetensors, .pth or .npz)")] = EncodeConfig.weights,
    batch_size: Annotated[int, Opt("images per forward pass")] = EncodeConfig.batch_size,
    device: Annotated[str, Opt("auto | cpu | cuda")] = EncodeConfig.device,
    precision: Annotated[str, Opt("auto | bf16 | fp16 | fp32")] = EncodeConfig.precision,
    workers: Annotated[int, Opt("decode/preprocess threads")] = EncodeConfig.workers,
    seed: Annotated[int, Opt("seed for random-init weights")] = EncodeConfig.seed,
    overwrite: Annotated[bool, Opt("replace a store built with another encoder")] = EncodeConfig.overwrite,
    shard_capacity: Annotated[Optional[int], Opt("store rows per shard (default: the largest shard's row count)")] = EncodeConfig.shard_capacity,
):
    """Run the frozen ViT once over every fetched image and cache its token features in zarr."""
    from stages import encode as stage

    stage.run(EncodeConfig(shards=shards, store=store, model=model, weights=weights, batch_size=batch_size,
                           device=device, precision=precision, workers=workers, seed=seed, overwrite=overwrite,
                           shard_capacity=shard_capacity))


@app.command()
def train(
    ctx: typer.Context,
    recipe: Annotated[str, Opt("default | seed (the original 3-epoch lr 1e-4 recipe); explicit options win")] = TrainConfig.recipe,
    store: Annotated[Path, Opt("zarr feature store")] = TrainConfig.store,
    # torchrun's own parser rejects `--run` (a prefix of its --run-path) anywhere on the line: --run-dir works.
    run: Annotated[Path, Opt("run folder (config, metrics, checkpoints); under torchrun spell it --run-dir",
                             "--run", "--run-dir")] = TrainConfig.run,
    epochs: Annotated[int, Opt("epochs over the training split")] = TrainConfig.epochs,
    batch_size: Annotated[int, Opt("samples per step (global, across ranks)")] = TrainConfig.batch_size,
    lr: Annotated[float, Opt("AdamW learning rate")] = TrainConfig.lr,
    weight_decay: Annotated[float, Opt("AdamW decoupled weight decay (matrices only)")] = TrainConfig.weight_decay,
    beta1: Annotated[float, Opt("AdamW beta1")] = TrainConfig.beta1,
    beta2: Annotated[float, Opt("AdamW beta2")] = TrainConfig.beta2,
    grad_clip: Annotated[float, Opt("clip the gradient's global norm to this")] = TrainConfig.grad_clip,
    patience: Annotated[int, Opt("stop after N epoch-end validations without improvement (keeps the best); 0 = never")] = TrainConfig.patience,
    tie_embeddings: Annotated[bool, Opt("logits layer shares the token embedding matrix")] = TrainConfig.tie_embeddings,
    parallel_fraction: Annotated[float, Opt("share of parallel-prediction (CapPa) examples")] = TrainConfig.parallel_fraction,
    parallel_len: Annotated[Optional[int], Opt("length of every all-[MASK] parallel row (default: the longest training caption)")] = TrainConfig.parallel_len,
    mixing: Annotated[str, Opt("per-example | per-batch")] = TrainConfig.mixing,
    length_buckets: Annotated[int, Opt("sort each window of N batches by caption length (less padding); 0 = off")] = TrainConfig.length_buckets,
    max_len: Annotated[int, Opt("caption tokens incl. EOS")] = TrainConfig.max_len,
    max_steps: Annotated[Optional[int], Opt("stop after this many steps")] = TrainConfig.max_steps,
    layers: Annotated[int, Opt("decoder layers")] = TrainConfig.layers,
    width: Annotated[int, Opt("decoder width")] = TrainConfig.width,
    heads: Annotated[int, Opt("attention heads")] = TrainConfig.heads,
    mlp_dim: Annotated[int, Opt("MLP hidden size")] = TrainConfig.mlp_dim,
    warmup_steps: Annotated[int, Opt("linear warm-up steps")] = TrainConfig.warmup_steps,
    schedule: Annotated[str, Opt("constant | cosine")] = TrainConfig.schedule,
    seed: Annotated[int, Opt("seed for init, data order and mode draws")] = TrainConfig.seed,
    precision: Annotated[str, Opt("auto | bf16 | fp32")] = TrainConfig.precision,
    device: Annotated[str, Opt("auto | cpu | cuda")] = TrainConfig.device,
    compile: Annotated[bool, Opt("torch.compile the decoder")] = TrainConfig.compile,
    resume: Annotated[bool, Opt("continue from the run's last checkpoint")] = TrainConfig.resume,
    tokenizer: Annotated[str, Opt("'gpt2' (offline GPT-2 BPE) or a hub name / local path")] = TrainConfig.tokenizer,
    val_fraction: Annotated[float, Opt("share of samples (by key hash) held out for validation")] = TrainConfig.val_fraction,
    features: Annotated[str, Opt("auto | memory | stream: hold the store's features in memory or stream slabs")] = TrainConfig.features,
    checkpoint_every: Annotated[int, Opt("steps between checkpoints (also at each epoch end)")] = TrainConfig.checkpoint_every,
    log_every: Annotated[int, Opt("steps per metrics.jsonl train entry")] = TrainConfig.log_every,
):
    """Train the CapPa dual-mode caption decoder on cached features.

    Under `torchrun --nproc_per_node N -m pipeline train --run-dir DIR ...` it runs DDP (gloo on CPU, nccl on
    CUDA); the batch size stays global. Only rank 0 writes files and prints.
    """
    from pipeline.config import train_config
    from stages import train as stage

    # Only what the command line (or an environment variable) set overrides the recipe. Compared by name:
    # typer ships its own copy of click, whose ParameterSource is not click.core's.
    def given_here(k: str) -> bool:
        source = ctx.get_parameter_source(k)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    given = {k: v for k, v in ctx.params.items() if k != "recipe" and given_here(k)}
    stage.run(train_config(recipe, **given))


@app.command("eval")
def evaluate(
    run: Annotated[Path, Opt("run folder to evaluate")] = EvalConfig.run,
    beam_size: Annotated[int, Opt("beam size for the beam-search captions")] = EvalConfig.beam_size,
    limit: Annotated[Optional[int], Opt("validation samples to caption")] = EvalConfig.limit,
    device: Annotated[str, Opt("auto | cpu | cuda")] = EvalConfig.device,
    precision: Annotated[str, Opt("auto (the run's training precision where fast here) | bf16 | fp16 | fp32")] = EvalConfig.precision,
    store: Annotated[Optional[Path], Opt("feature store (default: the one recorded in the run)")] = EvalConfig.store,
    max_new_tokens: Annotated[int, Opt("longest generated caption, in tokens")] = EvalConfig.max_new_tokens,
    length_penalty: Annotated[float, Opt("beam search ranks captions by log-prob / length**this")] = EvalConfig.length_penalty,
    batch_size: Annotated[int, Opt("images per decoding batch")] = EvalConfig.batch_size,
    zero_shot_limit: Annotated[int, Opt("captioned samples also ranked zero-shot (colour, shape)")] = EvalConfig.zero_shot_limit,
    shards: Annotated[Optional[Path], Opt("WebDataset shards to read the grid's images from (default: data/shards)")] = EvalConfig.shards,
):
    """Caption the validation split, score it (COCO metrics, attributes, blind baseline), write a report."""
    from stages import evaluate as stage

    stage.run(EvalConfig(run=run, beam_size=beam_size, limit=limit, device=device, precision=precision, store=store,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, zero_shot_limit=zero_shot_limit,
                         shards=shards, length_penalty=length_penalty))


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="image files to caption")],
    run: Annotated[Path, Opt("trained run folder")] = CaptionConfig.run,
    beam_size: Annotated[int, Opt("1 = greedy")] = CaptionConfig.beam_size,
    device: Annotated[str, Opt("auto | cpu | cuda")] = CaptionConfig.device,
    precision: Annotated[str, Opt("auto (the run's training precision where fast here) | bf16 | fp16 | fp32")] = CaptionConfig.precision,
    max_new_tokens: Annotated[int, Opt("longest caption, in tokens")] = CaptionConfig.max_new_tokens,
    length_penalty: Annotated[float, Opt("beam search ranks captions by log-prob / length**this")] = CaptionConfig.length_penalty,
):
    """Caption new images with a trained run (same encoder and weights as its store)."""
    from stages import caption as stage

    stage.run(CaptionConfig(images=images, run=run, beam_size=beam_size, device=device, precision=precision,
                            max_new_tokens=max_new_tokens, length_penalty=length_penalty))


@app.command()
def verify(
    store: Annotated[Optional[Path], Opt("zarr feature store to read end to end (checksums, missing chunks)")] = None,
    run: Annotated[Optional[Path], Opt("run folder: checkpoints against their digests, metrics.jsonl, config.json")] = None,
):
    """Check a store and/or a run folder byte for byte; one line per problem, exit 2 if any."""
    from pipeline import verify as v

    v.run(store, run)


@app.command()
def status(
    shards: Annotated[Path, Opt("folder of WebDataset shards")] = StatusConfig.shards,
    store: Annotated[Path, Opt("zarr feature store")] = StatusConfig.store,
    runs: Annotated[Path, Opt("folder of training runs")] = StatusConfig.runs,
    json: Annotated[bool, Opt("print one JSON object instead of tables")] = StatusConfig.json,
):
    """Show fetch coverage, feature-cache coverage and training runs (fast: no torch import)."""
    from pipeline import status as st

    st.run(StatusConfig(shards=shards, store=store, runs=runs, json=json))


@app.command()
def bench(
    device: Annotated[str, Opt("auto | cpu | cuda")] = BenchConfig.device,
    precision: Annotated[str, Opt("auto | bf16 | fp32")] = BenchConfig.precision,
    quick: Annotated[bool, Opt("smaller sizes, under 2 minutes; writes nothing under docs/")] = BenchConfig.quick,
    json: Annotated[Path, Opt("JSON results (this machine kind's rows are merged in)")] = BenchConfig.json,
    markdown: Annotated[Path, Opt("markdown whose table is regenerated (only beside --json, full runs)")] = BenchConfig.markdown,
    repeats: Annotated[int, Opt("interleaved repeats per ratio")] = BenchConfig.repeats,
):
    """Measure every stage against the machine's matmul limit and a seed-style baseline."""
    from stages import bench as stage

    stage.run(BenchConfig(device=device, precision=precision, quick=quick, json=json, markdown=markdown,
                          repeats=repeats))


def main() -> None:
    """Entry point: user errors become one red line on stderr and exit code 2, never a traceback.

    Usage errors (bad option values) are typer's own: a short usage message and exit code 2.
    """
    try:
        app()
    except UserError as e:
        from rich.console import Console
        from rich.markup import escape

        word = "stopped" if isinstance(e, Interrupted) else "error"  # paths may hold "[/x]": never markup
        Console(stderr=True).print(f"[bold red]{word}:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
