"""The `pipeline` CLI's wiring: every stage-config field is an option (with its help), and parsing builds the config.

No stage runs: each test swaps the stage module the command imports for one whose `run(cfg)` records the
config (the thing under test is the CLI, generated from pipeline/config.py). The recipe's basics
(`--recipe seed --epochs 5`, no options = TrainConfig(), an unknown recipe raises) are in
test_early_stop.py; here they are extended: an explicit option equal to the default still wins,
every field beats the recipe, `original` and its old spelling `seed` are one recipe, and main()
turns an unknown recipe into one line and exit 2. Allowed values and ranges: test_options.py.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Optional, get_type_hints

import pytest
import typer
from conftest import cli_options
from typer.testing import CliRunner

from pipeline import cli
from pipeline.config import (
    RECIPES,
    Allowed,
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

COMMANDS = {  # command: (its config, the module whose run(cfg) it calls)
    "fetch": (FetchConfig, "stages.fetch"),
    "encode": (EncodeConfig, "stages.encode"),
    "train": (TrainConfig, "stages.train"),
    "eval": (EvalConfig, "stages.evaluate"),
    "caption": (CaptionConfig, "stages.caption"),
    "status": (StatusConfig, "pipeline.status"),
    "bench": (BenchConfig, "stages.bench"),
}
ARGUMENTS = {"caption": "images"}  # fields taken as positional arguments, not options


@pytest.fixture
def seen(monkeypatch) -> list:
    """The configs the commands hand to their stage's run(cfg), in call order."""
    import importlib

    got: list = []
    for _, module in COMMANDS.values():
        package, _, name = module.rpartition(".")
        fake = types.ModuleType(module)
        fake.run = got.append
        monkeypatch.setitem(sys.modules, module, fake)  # `from stages import train` finds it, torch not imported
        monkeypatch.setattr(importlib.import_module(package), name, fake, raising=False)
    return got


def invoke(argv: list[str], seen: list):
    """Run `pipeline ARGV` in-process; the one config the stage was given."""
    n = len(seen)
    r = CliRunner().invoke(cli.app, [str(a) for a in argv])
    assert r.exit_code == 0, (r.output, r.exception)
    assert len(seen) == n + 1
    return seen[-1]


def click_params(command: str) -> dict:
    group = typer.main.get_command(cli.app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_is_an_option_with_help(command):
    cls, _ = COMMANDS[command]
    params = click_params(command)
    for f in dataclasses.fields(cls):
        assert help_of(f).strip(), f"{cls.__name__}.{f.name} has no help (pipeline.config.knob)"
        assert f.name in params, f"`pipeline {command}` has no option for {cls.__name__}.{f.name}"
        p = params[f.name]
        assert p.help == help_of(f)
        kind = "argument" if f.name == ARGUMENTS.get(command) else "option"
        assert p.param_type_name == kind, (f.name, p.param_type_name)
        if kind == "option":
            flag = "--" + f.name.replace("_", "-")
            assert flag in p.opts, (flag, p.opts)
            if get_type_hints(cls)[f.name] is bool:
                assert p.secondary_opts == ["--no-" + f.name.replace("_", "-")]
            allowed = allowed_of(f)  # --help shows the allowed words or the range as the value
            if allowed.choices:
                assert p.metavar == "[" + "|".join(allowed.choices) + "]", (f.name, p.metavar)
            elif allowed.bounded():
                assert p.metavar.endswith(" " + allowed.describe()), (f.name, p.metavar)
    assert set(params) <= {f.name for f in dataclasses.fields(cls)} | {"help"}  # nothing but the config's fields


def test_help_lists_commands_and_new_train_options():
    r = CliRunner().invoke(cli.app, ["--help"])
    assert r.exit_code == 0
    for command in [*COMMANDS, "verify"]:
        assert command in r.output
    r = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Train the CapPa dual-mode caption decoder" in r.output
    for flag in ("--stream-buffer-slabs", "--cross-attention", "--weight-decay", "--grad-clip", "--run-dir",
                 "--recipe", "--no-tie-embeddings"):
        assert flag in r.output, flag
    r = CliRunner().invoke(cli.app, ["caption", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "images" in r.output and "image files to caption" in r.output


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_options_give_the_dataclass_defaults(command, seen):
    cls, _ = COMMANDS[command]
    if command == "caption":
        assert invoke(["caption", "a.jpg"], seen) == CaptionConfig(images=[Path("a.jpg")])
    else:
        assert invoke([command], seen) == cls()


def other_value(hint, default, allowed: Allowed):
    """A value of the field's type that is not its default, that the command line can spell and
    that the field allows."""
    if hint is bool:
        return not default
    if allowed.choices:
        return next(c for c in allowed.choices if c != default)
    if hint in (int, Optional[int]):
        return 5 if default is None else default + 3
    if hint is float:
        return next(v for v in (default + 0.25, default / 2) if allowed.inside(v))
    if hint in (Path, Optional[Path]):
        return Path("elsewhere") / (str(default) if default else "x")
    if hint is str:
        return f"{default}-other"
    raise AssertionError(f"no test value for {hint}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_settable_with_its_type(command, seen):
    """Every field given a non-default value on the command line arrives as that value, with the field's type."""
    cls, _ = COMMANDS[command]
    hints = get_type_hints(cls)
    values = {f.name: other_value(hints[f.name], f.default, allowed_of(f))
              for f in dataclasses.fields(cls) if f.name not in (ARGUMENTS.get(command), "recipe")}
    images = [Path("a.jpg"), Path("b c.png")]
    positional = [str(p) for p in images] if command == "caption" else []
    # every explicit option beats the recipe's
    extra = {"recipe": "original"} if command == "train" else {}
    cfg = invoke([command, *positional, *cli_options({**extra, **values})], seen)
    want = cls(**values, **extra, **({"images": images} if command == "caption" else {}))
    assert cfg == want
    for k, v in values.items():
        assert type(getattr(cfg, k)) is type(v), (k, type(getattr(cfg, k)))


def test_train_types_and_optionals(seen):
    cfg = invoke(["train", "--max-steps", "3", "--parallel-len", "9", "--lr", "2e-3", "--run-dir", "r",
                  "--compile", "--no-resume", "--stream-buffer-slabs", "2", "--cross-attention", "kv",
                  "--weight-decay", "0", "--grad-clip", "0.5"], seen)
    assert (cfg.max_steps, cfg.parallel_len, cfg.lr, cfg.run, cfg.compile, cfg.resume) == (3, 9, 2e-3, Path("r"),
                                                                                          True, False)
    assert (cfg.stream_buffer_slabs, cfg.cross_attention, cfg.weight_decay, cfg.grad_clip) == (2, "kv", 0.0, 0.5)
    assert isinstance(cfg.lr, float) and isinstance(cfg.run, Path)
    cfg = invoke(["train", "--run", "q"], seen)
    assert cfg.max_steps is None and cfg.parallel_len is None and cfg.run == Path("q")
    assert cfg == TrainConfig(run=Path("q"))
    cfg = invoke(["eval", "--limit", "4", "--store", "s.zarr"], seen)
    assert (cfg.limit, cfg.store, cfg.shards) == (4, Path("s.zarr"), None)
    assert invoke(["encode", "--overwrite"], seen).overwrite is True
    assert invoke(["encode", "--no-overwrite"], seen).overwrite is False
    assert invoke(["status", "--json"], seen).json is True
    assert invoke(["bench", "--json", "b.json", "--quick"], seen) == BenchConfig(json=Path("b.json"), quick=True)


def test_recipe_original_and_explicit_options_win(seen):
    """The original recipe's values, except each option given on the command line, even one equal
    to the default."""
    original = RECIPES["original"]
    want = TrainConfig(**original, recipe="original")
    assert invoke(["train", "--recipe", "original"], seen) == want
    cfg = invoke(["train", "--recipe", "original", "--lr", str(TrainConfig.lr), "--tie-embeddings",
                  "--run-dir", "r"], seen)
    assert cfg == dataclasses.replace(want, lr=TrainConfig.lr, tie_embeddings=True, run=Path("r"))
    assert cfg.lr != original["lr"] and cfg.epochs == original["epochs"]
    assert invoke(["train", "--recipe", "default", "--epochs", "2"], seen) == TrainConfig(epochs=2)


def test_seed_is_the_original_recipe_recorded_as_spelled(seen):
    """`--recipe seed` (what runs made before the rename record) sets the original recipe's values
    and is kept as spelled, so such a run resumes; the RNG seed is another option."""
    old = invoke(["train", "--recipe", "seed", "--seed", "3"], seen)
    new = invoke(["train", "--recipe", "original", "--seed", "3"], seen)
    assert old == dataclasses.replace(new, recipe="seed") and old.recipe == "seed"
    assert old.lr == RECIPES["original"]["lr"] != TrainConfig.lr and old.seed == 3
    r = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "the seed's" not in r.output and "[default|original|seed]" in r.output


def test_unknown_recipe_is_one_error_line_exit_2(seen, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline", "train", "--recipe", "nope", "--epochs", "1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2 and not seen
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ["error: unknown --recipe 'nope': must be one of default, original, seed"], err


def test_usage_errors_are_typers_exit_2(seen):
    for argv in (["caption"], ["train", "--epochs", "many"], ["train", "--stream-buffer-slabs"],
                 ["fetch", "--no-such-option", "1"]):
        r = CliRunner().invoke(cli.app, argv)
        assert r.exit_code == 2, (argv, r.output)
    assert not seen
