"""A damaged run folder: one line naming the file, `status` still shows the other runs, `--resume` falls back.

Each case damages a copy of the shared tiny run, then runs what a user runs: `pipeline status`, `pipeline verify
--run` (in-process, as `pipeline.cli.main` runs them), `pipeline eval` and `train --resume` (their stages).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import TINY_TRAIN
from test_faults_store import one_line, pipeline_cli
from typer.testing import CliRunner

from pipeline import cli
from pipeline.errors import UserError

pytestmark = pytest.mark.faults


@pytest.fixture
def runs(tiny_run, tmp_path):
    """A runs folder holding a good copy of the tiny run (`good`) and one to damage (`bad`)."""
    root = tmp_path / "runs"
    for name in ("good", "bad"):
        shutil.copytree(tiny_run, root / name)
    return root


def _status(runs: Path, tmp_path: Path) -> dict:
    r = CliRunner().invoke(cli.app, ["status", "--json", "--runs", str(runs), "--store", str(tmp_path / "no"),
                                     "--shards", str(tmp_path / "no")])
    assert r.exception is None and r.exit_code == 0, (r.output, r.exception)
    return {x["name"]: x for x in json.loads(r.output)["runs"]["runs"]}


DAMAGE = {  # file -> bytes a hostile edit or a bad disk leaves
    "config.json a list": ("config.json", b'[{"train": {}}]'),
    "config.json without a decoder": ("config.json", b'{"train": {}, "tokenizer": {}, "store": {}}'),
    "metrics.jsonl invalid UTF-8": ("metrics.jsonl", b'{"kind": "train", "step": 2}\n\xff\xfe caf\xe9\n{"step": 4}\n'),
    "metrics.jsonl a list line": ("metrics.jsonl", b'[1, 2]\n{"kind": "train", "step": 4}\n'),
    "metrics.jsonl a text step": ("metrics.jsonl", b'{"kind": "val", "step": "four"}\n'),
    "summary.json a number": ("summary.json", b"17"),
    "summary.json a text rate": ("summary.json", b'{"samples_per_s": "fast"}'),
    "last.json without a dir": ("checkpoints/last.json", b'{"step": 48}'),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_status_shows_an_unreadable_run_and_goes_on_and_verify_flags_it(runs, tmp_path, case):
    """Before: a JSON-list config.json or invalid UTF-8 in metrics.jsonl broke `status` for every run, and
    `verify --run` said OK for the list."""
    name, data = DAMAGE[case]
    (runs / "bad" / name).write_bytes(data)
    shown = _status(runs, tmp_path)
    assert shown["good"]["step"] == 48 and "error" not in shown["good"]
    one_line(shown["bad"]["error"], str(runs / "bad" / name))
    code, msg = pipeline_cli("verify", "--run", runs / "bad")
    assert code == 2 and "\n" not in msg, msg
    r = CliRunner().invoke(cli.app, ["verify", "--run", str(runs / "bad")])
    assert Path(name).name in r.output, r.output


def _overwrite(f: Path, at: int, n: int = 4096) -> None:
    data = bytearray(f.read_bytes())
    data[at:at + n] = bytes((b ^ 0x5A) for b in data[at:at + n])
    f.write_bytes(bytes(data))


def test_a_damaged_best_safetensors_is_refused_by_verify_and_eval(runs):
    """Before: 4 KB overwritten in best.safetensors, `verify --run` said "2 good checkpoint(s)" and eval used it."""
    from pipeline.config import EvalConfig
    from stages import evaluate

    best = runs / "bad" / "best.safetensors"
    assert json.loads((runs / "bad" / "best.json").read_text())["sha256"]
    _overwrite(best, best.stat().st_size // 2)
    r = CliRunner().invoke(cli.app, ["verify", "--run", str(runs / "bad")])
    assert isinstance(r.exception, UserError) and "best.safetensors: does not match the sha256" in r.output
    with pytest.raises(UserError) as e:
        evaluate.run(EvalConfig(run=runs / "bad", device="cpu", precision="fp32", limit=2))
    one_line(str(e.value), str(best))


def _forge(state: Path, payload) -> None:
    """Replace a checkpoint's state.pt and update its digests, as a hostile user would (digests are not a
    signature): only the loader's refusal to unpickle stands between the file and the code in it."""
    state.write_bytes(pickle.dumps(payload))
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    for f in (state.parent / "manifest.json", state.parent.parent / "last.json"):
        rec = json.loads(f.read_text())
        rec["sha256"]["state.pt"] = digest
        f.write_text(json.dumps(rec))


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the file appears only if the pickle was ever executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _resume(tiny_store, run: Path, epochs: int = 9):
    from pipeline.config import TrainConfig
    from stages import train

    return train.run(TrainConfig(store=tiny_store, run=run, epochs=epochs, resume=True, **TINY_TRAIN))


def test_a_state_file_swapped_for_a_pickle_is_one_line_and_never_unpickled(tiny_store, runs, tmp_path):
    """Before: torch's UnpicklingError as a traceback."""
    marker = tmp_path / "pwned"
    _forge(runs / "bad" / "checkpoints" / "step-00000048" / "state.pt", _Payload(marker))
    with pytest.raises(UserError) as e:
        _resume(tiny_store, runs / "bad")
    one_line(str(e.value), "step-00000048/state.pt")
    assert "not unpickled" in str(e.value) and not marker.exists()


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(tiny_store, runs, capsys):
    """RELIABILITY promised the fallback; before, `--resume` refused the run with "checkpoint ... is corrupt"."""
    ckpts = runs / "bad" / "checkpoints"
    _overwrite(ckpts / "step-00000048" / "model.safetensors", 200, 64)
    summary = _resume(tiny_store, runs / "bad")
    err = capsys.readouterr()
    assert "checkpoint step-00000048 is corrupt" in err.out + err.err
    assert "resuming" in err.out + err.err and "at step 42" in err.out + err.err
    assert summary["steps"] == 54 and summary["steps_this_run"] == 12
    _overwrite(ckpts / "step-00000048" / "state.pt", 10, 8)  # the new newest, and the one before it
    _overwrite(ckpts / "step-00000054" / "state.pt", 10, 8)
    with pytest.raises(UserError, match="every checkpoint in .* is corrupt") as e:
        _resume(tiny_store, runs / "bad", epochs=10)
    one_line(str(e.value), str(ckpts))


def test_eval_refuses_a_config_that_is_a_json_list(runs):
    """Before: AttributeError in eval ('list' object has no attribute 'get')."""
    from pipeline.config import EvalConfig
    from stages import evaluate

    (runs / "bad" / "config.json").write_text('[{"train": {}}]')
    with pytest.raises(UserError) as e:
        evaluate.run(EvalConfig(run=runs / "bad", device="cpu", precision="fp32", limit=2))
    one_line(str(e.value), str(runs / "bad" / "config.json"))


def _weights_of(run: Path) -> list[dict]:
    """The undamaged run's weight sets a reader may rightly pick: best, then each checkpoint's."""
    from safetensors.torch import load_file

    files = [run / "best.safetensors", *sorted(run.glob("checkpoints/step-*/model.safetensors"))]
    return [load_file(str(f)) for f in files]


@pytest.mark.slow
def test_sweep_every_run_file_damaged_reads_right_or_is_one_line(tiny_run, tmp_path):
    """For each file x {deleted, truncated, overwritten}: `status` shows the run or one line for it (and the
    good run beside it), `verify --run` is 0 or one line, eval's loader (`load_run`) and resume's
    (`checkpoint.load`) get weights the undamaged run holds (best, or a checkpoint after a `warning:`
    fallback) or refuse with one line naming a file of the run."""
    import torch

    from pipeline import checkpoint
    from pipeline.trained_run import load_run
    from test_faults_store import MODES, damage_file, files_under

    good = _weights_of(tiny_run)
    same = lambda sd: any(all(torch.equal(sd[k], g[k]) for k in g) for g in good)  # noqa: E731
    for rel in files_under(tiny_run):
        for mode in MODES:
            root = tmp_path / f"{mode}-{rel.replace('/', '_')}"
            shutil.copytree(tiny_run, root / "good")
            shutil.copytree(tiny_run, root / "bad")
            damage_file(root / "bad" / rel, mode)
            shown = _status(root, tmp_path)
            assert "error" not in shown["good"] and ("error" not in shown.get("bad", {}) or
                                                     str(root / "bad") in shown["bad"]["error"]), (rel, mode)
            code, msg = pipeline_cli("verify", "--run", root / "bad")
            assert code in (0, 2) and (code == 0 or "\n" not in msg.strip()), (rel, mode, msg)
            for load in (lambda: load_run(root / "bad", "cpu").decoder.state_dict(),
                         lambda: _resume_weights(root / "bad", checkpoint)):
                try:
                    weights = load()
                except UserError as e:
                    one_line(str(e), str(root / "bad"))
                    continue
                assert same(weights), (rel, mode)


def _resume_weights(run: Path, checkpoint) -> dict:
    """What `train --resume` restores: the checkpoint's weights, optimizer and scheduler state."""
    import torch

    from pipeline.config import DecoderConfig
    from pipeline.model import CaptionDecoder
    from pipeline.trained_run import read_record

    model = CaptionDecoder(DecoderConfig(**read_record(run)["decoder"]))
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.load(run / "checkpoints", model=model, optimizer=opt, restore_rng=False)
    return model.state_dict()
