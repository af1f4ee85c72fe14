"""Eval stage on the tiny trained run: every output file, numbers that agree with training,
refusals."""

from __future__ import annotations

import json
import math
import sys

import pytest
from PIL import Image

from pipeline.config import EvalConfig
from pipeline.errors import UserError
from pipeline.captions import ATTRIBUTES
from pipeline.metrics import METRICS


def run_copy(src, dst, edit=None):
    """A run folder sharing `src`'s checkpoints (symlink) with its own config.json, metrics.jsonl
    and eval/."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    if edit:
        edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text())
    (dst / "checkpoints").symlink_to(src / "checkpoints", target_is_directory=True)
    for name in ("best.json", "best.safetensors"):  # the best epoch's weights, which eval prefers
        if (src / name).exists():
            (dst / name).symlink_to(src / name)
    return dst


@pytest.fixture(scope="module")
def evaluated(tiny_run, tiny_shards, tmp_path_factory):
    from stages import evaluate

    run = run_copy(tiny_run, tmp_path_factory.mktemp("eval") / "run")
    # An untrained tiny decoder never says EOS: max_new_tokens bounds every caption (and the
    # parallel length search). fp32, the tiny run's precision: the numbers below must hold whatever
    # `auto` picks on this machine.
    res = evaluate.run(EvalConfig(run=run, limit=8, beam_size=2, batch_size=8, zero_shot_limit=4,
                                  shards=tiny_shards, max_new_tokens=16, device="cpu",
                                  precision="fp32"))
    return run, res


def test_eval_writes_every_file(evaluated):
    run, res = evaluated
    out = run / "eval"
    saved = json.loads((out / "eval.json").read_text())
    for key in ("run", "checkpoint", "store", "encoder", "encoder_random_init", "tokenizer",
                "split", "settings", "val_loss", "metrics", "attributes", "zero_shot", "samples",
                "timing", "figures", "wall_s"):
        assert key in saved, key
    for name in ("loss.png", "metrics.png", "samples.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200, name
    md = (out / "report.md").read_text()
    for part in ("RANDOM-INIT ENCODER", "## COCO caption metrics", "## Attribute accuracy",
                 "## Zero-shot", "## Baselines", "blind greedy", "![loss curves](loss.png)",
                 "![validation samples](samples.png)"):
        assert part in md, part
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_eval_numbers(evaluated, tiny_run):
    _, res = evaluated
    sets = ("greedy", "beam", "parallel", "blind_greedy", "blind_beam", "blind_parallel", "ngram")
    assert set(res["metrics"]) == set(sets)
    for s in sets:
        assert set(res["metrics"][s]) == set(METRICS)
        assert all(math.isfinite(v) and v >= 0 for v in res["metrics"][s].values())
        assert set(res["attributes"][s]) == {*ATTRIBUTES, "all", "whole"}
        assert 0 <= res["attributes"][s]["whole"] <= 1
    # baselines: the text-only n-gram (one caption for every image) and the "by chance" floor
    ng = res["baselines"]["ngram"]
    assert ng["order"] == 3 and math.isfinite(ng["val_loss"]) and ng["val_tokens"] > 0
    assert set(res["attributes"]["chance"]) == set(ATTRIBUTES)
    assert all(1 / 9 - 1e-9 <= v <= 1 for v in res["attributes"]["chance"].values())
    # the best a perfect eye can expect: at or above the floor
    ceiling = res["attributes"]["ceiling"]
    assert all(res["attributes"]["chance"][a] - 1e-9 <= ceiling[a] <= 1 for a in ATTRIBUTES)
    beaten = res["val_loss"]["loss_ar"] < ng["val_loss"]
    assert bool(res["warnings"]) == (not beaten)
    # eval uses the best epoch's weights, which the trainer kept
    assert res["checkpoint"]["chosen"] == "best"
    assert res["checkpoint"]["dir"].endswith("best.safetensors")
    k = min(8, res["split"]["val"])  # --limit 8 of the split's validation samples
    assert res["split"]["captioned"] == k == len(res["samples"]) > 0
    assert all(s["reference"] and isinstance(s["greedy"], str) for s in res["samples"])
    assert set(res["blind_captions"]) == {"greedy", "beam", "parallel"}
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert res["settings"]["max_new_tokens"] == 16
    assert res["settings"]["parallel_len"] == cfg["decoder"]["parallel_len"]
    assert all(len(s["parallel"].split()) <= cfg["decoder"]["parallel_len"] for s in res["samples"])
    # Synthetic data: every image is scored against its 5 references, the training caption first.
    assert res["settings"]["references_per_image"] == 5
    assert all(len(s["references"]) == 5 and s["references"][0] == s["reference"]
               for s in res["samples"])
    assert res["zero_shot"]["colour"]["samples"] == min(4, k)
    assert res["zero_shot"]["colour"]["chance"] == pytest.approx(1 / 9)
    assert res["grid_images"]["shard"] == k  # the grid's pictures were read back from the shards
    _assert_val_loss_is_trainings(res, tiny_run)


def _assert_val_loss_is_trainings(res: dict, tiny_run) -> None:
    """Same checkpoint, same split, same loss: the eval's validation loss is training's validation
    entry (the tiny run trained in fp32). In fp32 only the batching differs (summation order: rel
    1e-5); in bf16 the logits are rounded to 8 significant bits, and the mean loss stays within one
    bf16 epsilon (2^-7)."""
    from pipeline.devices import precision_rtol

    entries = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    # the validation entry of the checkpoint eval chose (the best epoch's; the newest when none was
    # kept)
    step = res["checkpoint"]["step"]
    (last_val,) = [e for e in entries if e["kind"] == "val" and e["step"] == step]
    rel = precision_rtol(res["precision"])
    assert res["val_loss"]["loss_ar"] == pytest.approx(last_val["loss_ar"], rel=rel)
    assert res["val_loss"]["loss_par"] == pytest.approx(last_val["loss_par"], rel=rel)


def test_eval_in_bf16_end_to_end(tiny_run, tiny_shards, tmp_path):
    """bf16 (what `auto` would pick for a bf16 run on a native-bf16 CPU or a GPU), kept tiny for
    AVX2 CPUs."""
    from stages import evaluate

    run = run_copy(tiny_run, tmp_path / "run")
    res = evaluate.run(EvalConfig(run=run, limit=2, beam_size=2, batch_size=8, zero_shot_limit=1,
                                  grid=2, shards=tiny_shards, max_new_tokens=6, device="cpu",
                                  precision="bf16"))
    assert res["precision"] == "bf16"
    assert json.loads((run / "eval" / "eval.json").read_text())["precision"] == "bf16"
    assert res["split"]["captioned"] == 2
    assert all(isinstance(s["parallel"], str) for s in res["samples"])
    _assert_val_loss_is_trainings(res, tiny_run)
    entries = map(json.loads, (tiny_run / "metrics.jsonl").read_text().splitlines())
    last_val = [e for e in entries if e["kind"] == "val"][-1]
    exact = res["val_loss"]["loss_ar"] == pytest.approx(last_val["loss_ar"], rel=1e-7)
    assert not exact  # it really ran in bf16: the loss is not fp32's to 7 digits


def test_tokenizer_mismatch_is_refused(tiny_run, tmp_path):
    from stages import evaluate

    run = run_copy(tiny_run, tmp_path / "run", lambda c: c["tokenizer"].update(vocab_size=50000))
    with pytest.raises(UserError, match="tokenizer 'gpt2' now loads with vocab_size=50258"):
        evaluate.run(EvalConfig(run=run, device="cpu"))


def test_store_from_another_encoder_is_refused(tiny_run, tmp_path):
    from stages import evaluate

    def edit(c):
        c["store"]["encoder"]["weights"]["state_sha256"] = "0" * 64

    run = run_copy(tiny_run, tmp_path / "run", edit)
    with pytest.raises(UserError, match="trained on features of"):
        evaluate.run(EvalConfig(run=run, device="cpu"))


def test_empty_validation_split_is_refused(tiny_run, tmp_path):
    from stages import evaluate

    run = run_copy(tiny_run, tmp_path / "run", lambda c: c["split"].update(val_fraction=0.0))
    with pytest.raises(UserError, match="validation split .* is empty"):
        evaluate.run(EvalConfig(run=run, device="cpu"))


def cli_error(argv: list[str], capsys, monkeypatch) -> str:
    """Run `pipeline ARGV` in-process (no interpreter start-up); assert exit code 2 and one line;
    return it."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert out == "" and len(lines) == 1, err
    return lines[0]


def test_cli_missing_run_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    line = cli_error(["eval", "--run", str(tmp_path / "nope")], capsys, monkeypatch)
    assert line.startswith("error: no run folder")


def _retell(src, dst):
    """Copies of `src`'s shards whose samples keep their keys and images but tell other captions:
    what another fetch (other list or seed) writes under the same shard names and keys."""
    import io
    import tarfile

    dst.mkdir()
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as old, tarfile.open(dst / tar.name, "w") as new:
            for m in old:
                data = old.extractfile(m).read() if m.isfile() else b""
                if m.name.endswith(".txt"):
                    data = b"another fetch's caption"
                    m.size = len(data)
                new.addfile(m, io.BytesIO(data))
    return dst


def test_eval_never_draws_another_fetchs_images_under_this_runs_keys(tiny_run, tiny_shards, tmp_path):
    """`eval --shards OTHER`: shards named and keyed like the store's but holding other samples
    are not drawn under this run's captions; the grid says how many and prints a warning."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    run = run_copy(tiny_run, tmp_path / "run")
    other = _retell(tiny_shards, tmp_path / "other")
    args = ["eval", "--run", str(run), "--shards", str(other), "--limit", "2", "--grid", "2",
            "--beam-size", "1", "--zero-shot-limit", "0", "--max-new-tokens", "4",
            "--device", "cpu", "--precision", "fp32"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    grid = json.loads((run / "eval" / "eval.json").read_text())["grid_images"]
    assert grid["shard"] == 0 and grid["other"] == 2, grid
    assert "other samples than the store encoded" in " ".join(res.output.split())  # rich wraps
    res = CliRunner().invoke(app, [*args[:3], "--shards", str(tiny_shards), *args[5:]])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "eval" / "eval.json").read_text())["grid_images"]["shard"] == 2
