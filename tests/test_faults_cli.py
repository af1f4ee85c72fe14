"""Fault injection, wrong combinations: every one is a single `error:` line, exit code 2, no traceback.

Runs `pipeline ...` in-process through cli.main (an exception other than UserError would surface here as a
test error), plus one fresh interpreter. Already covered elsewhere (not repeated): train on a missing store
(tests/test_train.py), eval on a missing run (test_evaluate.py), caption of a text file or a missing file and
a run whose encoder weights cannot be rebuilt (test_caption.py), --resume with other settings (test_train.py),
an option's value outside its allowed values (test_options.py, every option).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from conftest import TINY_TRAIN, cli_options, store_rows

from pipeline import cli
from pipeline.store import FeatureStore

pytestmark = pytest.mark.faults


def _args(opts: dict) -> list[str]:
    return cli_options(opts)


@pytest.fixture(scope="module")
def wrong(tiny_shards, tiny_store, tiny_run, tmp_path_factory):
    """Artefacts that do not fit together, each built cheaply from the session's tiny ones."""
    from pipeline.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("wrong")
    ref = FeatureStore.open(tiny_store)
    # a store that exists but holds no finished shard (an encode killed before its first shard)
    FeatureStore.create(d / "empty.zarr", encoder=ref.encoder, tokens=ref.tokens, width=ref.width,
                        shard_capacity=ref.shard_capacity, shards=["00000.tar"])
    (d / "notastore").mkdir()
    (d / "notastore" / "readme.txt").write_text("hello")
    # a complete store from another encoder: the same features, recorded as vit_small seed 1
    other = {**ref.encoder, "model": "vit_small_patch16_224",
             "weights": {"kind": "random-init", "seed": 1, "state_sha256": "1" * 64}}
    st = FeatureStore.create(d / "other.zarr", encoder=other, tokens=ref.tokens, width=ref.width,
                             shard_capacity=ref.shard_capacity, shards=["00000.tar"])
    idx = ref.index()
    n = int((idx.rows < ref.shard_capacity).sum())
    st.write_shard(0, store_rows(ref, idx.rows[:n]), idx.keys[:n], idx.captions[:n], idx.meta[:n])
    # runs: empty; configured but killed before its first checkpoint; a copy (checkpoints hard-linked:
    # a refusal must come before any write, and atomic writes would not touch the originals anyway)
    (d / "empty_run").mkdir()
    (d / "no_ckpt").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(tiny_run / name, d / "no_ckpt" / name)
    shutil.copytree(tiny_run, d / "run", copy_function=os.link)
    for name in ("config.json", "metrics.jsonl"):
        (d / "run" / name).unlink()
        shutil.copy(tiny_run / name, d / "run" / name)
    # a tokenizer folder that is not the run's: GPT-2 plus two added tokens
    hf = load_tokenizer("gpt2").hf
    hf.save_pretrained(d / "tok")
    cfg = json.loads((tiny_run / "config.json").read_text())
    cfg["tokenizer"]["name"] = str(d / "tok")  # the run says "the tokenizer in this folder" ...
    (d / "tok_run").mkdir()
    (d / "tok_run" / "config.json").write_text(json.dumps(cfg))
    (d / "tok_run" / "checkpoints").symlink_to(tiny_run / "checkpoints", target_is_directory=True)
    from transformers import AutoTokenizer  # ... and that folder now holds another vocabulary

    other_tok = AutoTokenizer.from_pretrained(d / "tok")
    other_tok.add_tokens(["<extra_a>", "<extra_b>"])
    other_tok.save_pretrained(d / "tok")
    # files that are not images
    with tarfile.open(sorted(tiny_shards.glob("*.tar"))[0]) as tf:
        jpg = tf.extractfile(next(m for m in tf if m.name.endswith(".jpg"))).read()
    (d / "ok.jpg").write_bytes(jpg)
    (d / "half.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "no_shards").mkdir()
    recipe = _args({**TINY_TRAIN, "epochs": json.loads((tiny_run / "config.json").read_text())["train"]["epochs"]})
    return d, tiny_store, recipe


CASES = {  # name: (argv with {d} = the fixture folder, {store} = tiny_store, {recipe}), the line's gist
    "train on an empty store": ("train --store {d}/empty.zarr --run {d}/new", "has no finished shard yet"),
    "train on a folder that is no store": ("train --store {d}/notastore --run {d}/new", "not a zarr v3"),
    "encode with no finished shards": ("encode --shards {d}/no_shards --store {d}/x.zarr", "no finished shards"),
    "eval with an empty store": ("eval --run {d}/run --store {d}/empty.zarr", "has no finished shard yet"),
    "eval of an empty run folder": ("eval --run {d}/empty_run", "has no config.json"),
    "eval of a run with no checkpoint": ("eval --run {d}/no_ckpt", "no complete checkpoint"),
    "caption with an empty run folder": ("caption {d}/ok.jpg --run {d}/empty_run", "has no config.json"),
    "caption with a run with no checkpoint": ("caption {d}/ok.jpg --run {d}/no_ckpt", "no complete checkpoint"),
    "caption of half a jpeg": ("caption {d}/half.jpg --run {d}/run", "half.jpg is not a readable image"),
    "caption of an empty file": ("caption {d}/zero.jpg --run {d}/run", "zero.jpg is not a readable image"),
    "eval on a store from another encoder": ("eval --run {d}/run --store {d}/other.zarr",
                                             "was encoded with vit_small_patch16_224 (random-init), but the run "
                                             "was trained on features of vit_tiny_patch16_224"),
    "resume on a store from another encoder": ("train --resume --run {d}/run --store {d}/other.zarr {recipe}",
                                               "--resume: the store was encoded with another encoder"),
    "resume with another tokenizer": ("train --resume --run {d}/run --store {store} --tokenizer {d}/tok {recipe}",
                                      "--resume: this run was started with tokenizer='gpt2'"),
    "eval when the run's tokenizer changed": ("eval --run {d}/tok_run", "now loads with vocab_size=50260"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_combination_is_one_error_line(wrong, case, capsys, monkeypatch):
    d, store, recipe = wrong
    template, gist = CASES[case]
    argv = template.format(d=d, store=store, recipe="RECIPE").split()
    if "RECIPE" in argv:
        i = argv.index("RECIPE")
        argv[i:i + 1] = recipe
    before = {p: p.stat().st_mtime_ns for p in (d / "run").rglob("*")}
    monkeypatch.setattr(sys, "argv", ["pipeline", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("warning:")]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out + err, err
    assert gist in errors[0], errors[0]
    assert {p: p.stat().st_mtime_ns for p in (d / "run").rglob("*")} == before  # nothing was touched
    assert not (d / "new").exists() and not (d / "x.zarr").exists()


def test_fresh_interpreter_one_line_exit_2(wrong):
    d, _, _ = wrong
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--run", str(d / "no_ckpt")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no complete checkpoint" in lines[0], p.stderr


def test_markup_in_paths_is_printed_not_parsed(tmp_path, capsys, monkeypatch):
    """A path holding `[/x]` (rich markup) is printed as it is: never a MarkupError traceback."""
    odd = tmp_path / "a[/x]b[bold]"
    monkeypatch.setattr(sys, "argv", ["pipeline", "encode", "--shards", str(odd / "shards")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert [x for x in err.splitlines() if x.strip()] == [f"error: no shards folder {odd / 'shards'}: run `pipeline "
                                                         "fetch` first"]
    from pipeline import status
    from pipeline.config import StatusConfig

    status.run(StatusConfig(shards=odd / "shards", store=odd / "f.zarr", runs=odd / "runs"))
    out = capsys.readouterr()
    assert "[/x]" in out.out + out.err
