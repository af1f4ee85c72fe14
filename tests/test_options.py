"""Every option's allowed values: declared once on its knob (pipeline/config.py), checked whenever
a stage config is built, from the command line or from Python, and refused with one line naming
the option.

The rule tests walk every field of every stage config, so a new option is covered once it exists.
The command-line cases are the bad values a user hits (`train --grad-clip -1` trained backwards,
`--beta2 1.5` was a traceback, `--max-len 100000` hung): one `error:` line, exit 2, nothing written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from typing import Optional, get_type_hints

import pytest

from pipeline import cli
from pipeline.config import (
    RECIPES,
    BenchConfig,
    CaptionConfig,
    EncodeConfig,
    EvalConfig,
    FetchConfig,
    StatusConfig,
    TrainConfig,
    allowed_of,
    option_name,
    train_config,
)
from pipeline.errors import UserError

CONFIGS = (FetchConfig, EncodeConfig, TrainConfig, EvalConfig, CaptionConfig, StatusConfig,
           BenchConfig)
FIELDS = [(cls, f) for cls in CONFIGS for f in dataclasses.fields(cls)]
RULED = [(cls, f) for cls, f in FIELDS if allowed_of(f).choices or allowed_of(f).bounded()]
FLOATS = [(cls, f) for cls, f in FIELDS if get_type_hints(cls)[f.name] in (float, Optional[float])]
# Float options where any finite number is meaningful: beam search divides by length**penalty, and a
# negative penalty (favouring short captions) is a choice, not a mistake.
ANY_FINITE = {"length_penalty"}


def ids(pairs) -> list[str]:
    return [f"{cls.__name__}.{f.name}" for cls, f in pairs]


def refusal(cls, **values) -> str:
    """The one line a config built with `values` is refused with."""
    with pytest.raises(UserError) as e:
        cls(**values)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("cls,f", FIELDS, ids=ids(FIELDS))
def test_every_numeric_option_has_a_range(cls, f):
    """Every int option has a lower bound; every float one a range (or is any finite number)."""
    hint = get_type_hints(cls)[f.name]
    allowed = allowed_of(f)
    if hint in (int, Optional[int]):
        assert allowed.ge is not None or allowed.gt is not None, f"{f.name}: no lower bound"
    if hint in (float, Optional[float]) and f.name not in ANY_FINITE:
        assert allowed.bounded(), f"{f.name}: no range"


def edges(allowed, is_float: bool) -> tuple[list, list]:
    """(values at the rule's edges that pass, values just outside that must be refused)."""
    if allowed.choices:
        return list(allowed.choices), ["nope", allowed.choices[0].upper(), ""]
    step = 1e-6 if is_float else 1
    ok, bad = [], []
    for bound, inside, closed in ((allowed.ge, +1, True), (allowed.gt, +1, False),
                                  (allowed.le, -1, True), (allowed.lt, -1, False)):
        if bound is None:
            continue
        edge = float(bound) if is_float else int(bound)
        (ok if closed else bad).append(edge)
        (bad if closed else ok).append(edge - inside * step if closed else edge + inside * step)
    return ok, bad


@pytest.mark.parametrize("cls,f", RULED, ids=ids(RULED))
def test_rule_allows_its_edges_and_refuses_just_outside(cls, f):
    """Built from Python (as a stage called directly is): the edge passes, one step past it is
    refused with one line naming the option as the command line spells it."""
    allowed = allowed_of(f)
    is_float = get_type_hints(cls)[f.name] in (float, Optional[float])
    ok, bad = edges(allowed, is_float)
    flag = option_name(f.name)
    for v in ok:
        assert getattr(cls(**{f.name: v}), f.name) == v
    for v in bad:
        msg = refusal(cls, **{f.name: v})
        assert msg.startswith((f"{flag} must be ", f"unknown {flag} ")), msg
        assert allowed.describe() in msg, msg
    base = cls()  # dataclasses.replace builds a new config: it is checked too
    with pytest.raises(UserError):
        dataclasses.replace(base, **{f.name: bad[0]})


@pytest.mark.parametrize("cls,f", FLOATS, ids=ids(FLOATS))
def test_float_options_refuse_nan_and_inf(cls, f):
    flag = option_name(f.name)
    for v in (math.nan, math.inf, -math.inf):
        msg = refusal(cls, **{f.name: v})
        assert msg.startswith(f"{flag} must be a finite number") and msg.endswith(f"(got {v})"), msg


def test_optional_options_pass_unset_and_are_checked_when_set():
    assert TrainConfig(max_steps=None, parallel_len=None).max_steps is None
    assert EvalConfig(limit=None).limit is None
    assert EncodeConfig(shard_capacity=None).shard_capacity is None
    assert refusal(EvalConfig, limit=0) == "--limit must be >= 1 (got 0)"
    assert refusal(TrainConfig, parallel_len=0) == "--parallel-len must be >= 1 (got 0)"


def test_a_number_given_as_text_from_python_is_one_line():
    assert refusal(TrainConfig, lr="1e-3") == "--lr must be a number > 0 (got '1e-3')"
    assert refusal(FetchConfig, retries=True).startswith("--retries must be a number")


def test_recipes_and_their_aliases_build_allowed_configs():
    for name in (*RECIPES, "seed"):
        cfg = train_config(name)
        assert cfg.recipe == name
    assert dataclasses.replace(train_config("seed"), recipe="original") == train_config("original")
    assert train_config("original", lr=5e-4).lr == 5e-4
    want = "unknown --recipe 'notebook': must be one of default, original, seed"
    assert refusal(TrainConfig, recipe="notebook") == want
    with pytest.raises(UserError, match="unknown --recipe 'x'"):
        train_config("x")
    with pytest.raises(UserError, match="--grad-clip must be > 0"):  # explicit options are checked
        train_config("original", grad_clip=0.0)


# (argv, the one error line): the bad values a user can type, each refused before anything runs.
CLI_CASES = [
    ("train --grad-clip -1", "--grad-clip must be > 0 (got -1.0)"),
    ("train --grad-clip 0", "--grad-clip must be > 0 (got 0.0)"),
    ("train --beta2 1.5", "--beta2 must be in [0, 1) (got 1.5)"),
    ("train --beta1 1", "--beta1 must be in [0, 1) (got 1.0)"),
    ("train --lr inf", "--lr must be a finite number > 0 (got inf)"),
    ("train --lr nan", "--lr must be a finite number > 0 (got nan)"),
    ("train --lr 0", "--lr must be > 0 (got 0.0)"),
    ("train --weight-decay -5", "--weight-decay must be >= 0 (got -5.0)"),
    ("train --max-len 100000", "--max-len must be in [2, 1024] (got 100000)"),
    ("train --recipe seed --epochs 0", "--epochs must be >= 1 (got 0)"),
    ("train --mixing per-row", "unknown --mixing 'per-row': must be one of per-example, per-batch"),
    ("train --val-fraction 1", "--val-fraction must be in [0, 1) (got 1.0)"),
    ("train --seed -1", "--seed must be in [0, 4294967295] (got -1)"),
    ("eval --length-penalty nan", "--length-penalty must be a finite number (got nan)"),
    ("eval --grid -1", "--grid must be >= 0 (got -1)"),
    ("eval --zero-shot-limit -1", "--zero-shot-limit must be >= 0 (got -1)"),
    ("eval --limit 0", "--limit must be >= 1 (got 0)"),
    ("caption a.jpg --beam-size 0", "--beam-size must be >= 1 (got 0)"),
    ("fetch --max-image-area 0", "--max-image-area must be >= 1 (got 0)"),
    ("fetch --retries -1", "--retries must be in [0, 100] (got -1)"),
    ("fetch --retries 1000", "--retries must be in [0, 100] (got 1000)"),
    ("fetch --timeout 0", "--timeout must be >= 1 (got 0)"),
    ("fetch --count 0", "--count must be >= 1 (got 0)"),
    ("fetch --broken-fraction 1", "--broken-fraction must be in [0, 1) (got 1.0)"),
    ("fetch --image-size 100000", "--image-size must be in [224, 4096] (got 100000)"),
    ("encode --device tpu", "unknown --device 'tpu': must be one of auto, cpu, cuda"),
    ("encode --batch-size 0", "--batch-size must be >= 1 (got 0)"),
    ("bench --repeats 0", "--repeats must be >= 1 (got 0)"),
]


@pytest.mark.parametrize("argv,line", CLI_CASES, ids=[a for a, _ in CLI_CASES])
def test_bad_option_is_one_line_exit_2_and_writes_nothing(argv, line, tmp_path, monkeypatch,
                                                          capsys):
    """`pipeline ARGV` in an empty folder (every default path is relative): one line, exit 2, and
    the folder is still empty, so no stage started."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pipeline", *argv.split()])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert e.value.code == 2, (out, err)
    assert [x for x in err.splitlines() if x.strip()] == [f"error: {line}"], err
    assert "Traceback" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_fresh_interpreter_refuses_a_bad_option_before_writing(tmp_path):
    run = tmp_path / "r"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "train", "--run", str(run), "--store",
                        str(tmp_path / "s.zarr"), "--grad-clip", "-1"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines == ["error: --grad-clip must be > 0 (got -1.0)"], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_allowed_values():
    from typer.testing import CliRunner

    r = CliRunner().invoke(cli.app, ["fetch", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "INTEGER in [0, 100]" in r.output and "[multiprocessing|pyspark|ray]" in r.output
    r = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"})
    for shown in ("FLOAT > 0", "FLOAT in [0, 1)", "INTEGER in [2, 1024]", "[auto|kv|absorbed]"):
        assert shown in r.output, shown
