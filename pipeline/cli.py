"""The `pipeline` command: each subcommand builds a config and calls one stage's `run(cfg)`.

A stage command's options are generated from its config dataclass (pipeline/config.py): one
`--field-name` per field, with the field's type, default, help and allowed values (`knob`), so each
knob is written once, there. Building the config validates it: a bad value is one `error:` line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, get_args, get_type_hints

import typer

from pipeline.config import (
    BenchConfig,
    CaptionConfig,
    EncodeConfig,
    EvalConfig,
    FetchConfig,
    StatusConfig,
    TrainConfig,
    allowed_of,
    help_of,
)
from pipeline.errors import Interrupted, UserError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) phones home on import

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Pay the encoder once: fetch -> encode (frozen ViT, zarr cache) -> train a CapPa decoder -> eval.",
)


def given_here(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was set on the command line (or by an environment variable), not left at its default.

    Compared by name: typer ships its own copy of click, whose ParameterSource is not click.core's.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def metavar_of(f: dataclasses.Field, hint: Any) -> str | None:
    """The option's value as --help shows it: `[auto|cpu|cuda]`, `FLOAT > 0`; None = typer's own."""
    allowed = allowed_of(f)
    if allowed.choices:
        return "[" + "|".join(allowed.choices) + "]"
    if allowed.bounded():
        kind = "FLOAT" if float in (hint, *get_args(hint)) else "INTEGER"
        return f"{kind} {allowed.describe()}"
    return None


def config_command(cls: type, *, name: str | None = None, argument: str | None = None,
                   flags: dict[str, tuple[str, ...]] | None = None,
                   build: Callable[[dict[str, Any], set[str]], Any] | None = None):
    """Register the decorated `body(cfg)` as the subcommand whose options are the fields of dataclass `cls`.

    Each field becomes typer's `--field-name` (bools: `--x/--no-x`) with the field's type, default and help;
    `argument` is the field taken as positional arguments instead, `flags` gives fields other option names.
    `build(values, given)` makes the config from all parsed values and the names given on the command line
    (default: `cls(**values)`). The command's help is the body's docstring.
    """
    hints, flags = get_type_hints(cls), flags or {}
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    for f in dataclasses.fields(cls):
        if f.name == argument:  # required: no default
            info, default = typer.Argument(help=help_of(f)), inspect.Parameter.empty
        elif f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: an option needs a plain default (a factory's is not shown)")
        else:
            info = typer.Option(*flags.get(f.name, ()), help=help_of(f),
                                metavar=metavar_of(f, hints[f.name]))
            default = f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[hints[f.name], info]))

    def register(body: Callable[[Any], None]) -> Callable[[Any], None]:
        def command(ctx: typer.Context, **values: Any) -> None:
            cfg = build(values, {k for k in values if given_here(ctx, k)}) if build else cls(**values)
            body(cfg)

        # typer reads the parameters from inspect.signature and their types from get_type_hints
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__qualname__, body.__doc__
        app.command(name)(command)
        return body

    return register


@config_command(FetchConfig)
def fetch(cfg: FetchConfig) -> None:
    """Download a (caption, url) list into WebDataset shards with img2dataset."""
    from stages import fetch as stage

    stage.run(cfg)


@config_command(EncodeConfig)
def encode(cfg: EncodeConfig) -> None:
    """Run the frozen ViT once over every fetched image and cache its token features in zarr."""
    from stages import encode as stage

    stage.run(cfg)


def recipe_config(values: dict[str, Any], given: set[str]) -> TrainConfig:
    """`--recipe`'s values, then only the options given on the command line (not every option's default)."""
    from pipeline.config import train_config

    return train_config(values["recipe"], **{k: values[k] for k in given if k != "recipe"})


# torchrun's own parser rejects `--run` (a prefix of its --run-path) anywhere on the line: --run-dir works.
@config_command(TrainConfig, flags={"run": ("--run", "--run-dir")}, build=recipe_config)
def train(cfg: TrainConfig) -> None:
    """Train the CapPa dual-mode caption decoder on cached features.

    Under `torchrun --nproc_per_node N -m pipeline train --run-dir DIR ...` it runs DDP (gloo on CPU, nccl on
    CUDA); the batch size stays global. Only rank 0 writes files and prints.
    """
    from stages import train as stage

    stage.run(cfg)


@config_command(EvalConfig, name="eval")
def evaluate(cfg: EvalConfig) -> None:
    """Caption the validation split, score it (COCO metrics, attributes, blind baseline), write a report."""
    from stages import evaluate as stage

    stage.run(cfg)


@config_command(CaptionConfig, argument="images")
def caption(cfg: CaptionConfig) -> None:
    """Caption new images with a trained run (same encoder and weights as its store)."""
    from stages import caption as stage

    stage.run(cfg)


@app.command()
def verify(
    store: Annotated[Optional[Path], typer.Option(
        help="zarr feature store to read end to end (checksums, missing chunks)")] = None,
    run: Annotated[Optional[Path], typer.Option(
        help="run folder: checkpoints against their digests, metrics.jsonl, config.json")] = None,
):
    """Check a store and/or a run folder byte for byte; one line per problem, exit 2 if any."""
    from pipeline import verify as v

    v.run(store, run)


@config_command(StatusConfig)
def status(cfg: StatusConfig) -> None:
    """Show fetch coverage, feature-cache coverage and training runs (fast: no torch import)."""
    from pipeline import status as st

    st.run(cfg)


@config_command(BenchConfig)
def bench(cfg: BenchConfig) -> None:
    """Measure every stage against the machine's matmul limit and a seed-style baseline."""
    from stages import bench as stage

    stage.run(cfg)


def main() -> None:
    """Entry point: user errors become one red line on stderr and exit code 2, never a traceback.

    A value outside an option's allowed values is such an error (raised when the config is built); a
    value that does not parse as the option's type is typer's usage error, also exit code 2.
    """
    try:
        app()
    except UserError as e:
        from rich.console import Console
        from rich.markup import escape

        from pipeline.osutil import printable

        # Paths may hold "[/x]" (never markup) or escape codes and newlines (never reach the terminal raw).
        word = "stopped" if isinstance(e, Interrupted) else "error"
        text = escape(printable(str(e)))
        Console(stderr=True).print(f"[bold red]{word}:[/] {text}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
