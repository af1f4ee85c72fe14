"""pipeline.api.Captioner: the README's example runs as written, its captions are `pipeline
caption`'s and those of the stored features, and its refusals are one line."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import store_rows

from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The python block between README's `<!-- api-example -->` markers."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- api-example -->\n", 1)[1].split("<!-- /api-example -->", 1)[0]
    lines = block.strip().splitlines()
    assert lines[0] == "```python" and lines[-1] == "```", block
    return "\n".join(lines[1:-1]) + "\n"


@pytest.fixture(scope="module")
def captioner(tiny_run):
    from pipeline.api import Captioner

    return Captioner.from_run(tiny_run, device="cpu", precision="fp32")


def test_the_readme_example_runs_and_agrees_with_the_cli(tiny_run, tiny_shards, tmp_path):
    """The README's code, with the tiny run and its synthetic images in place of the default
    ones, run by a fresh interpreter from the repository root: three captions, the first (a file)
    the same as that of its encoded features and as `pipeline caption` prints."""
    code = readme_example()
    synthetic = tiny_shards.parent / "synthetic"  # the fetch fixture's drawn images
    for old, new in (('"cache/runs/default"', f'"{tiny_run}"'), ("data/synthetic", str(synthetic))):
        assert old in code, old
        code = code.replace(old, new)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    printed = [ast.literal_eval(line) for line in out.stdout.splitlines()]
    assert len(printed) == 3 and all(len(p) == 1 and p[0] for p in printed), out.stdout
    assert printed[0] == printed[2]  # the file, and its features encoded by `encode`

    image = synthetic / "images" / "00000000.jpg"
    cli = subprocess.run([sys.executable, "-m", "pipeline", "caption", str(image), "--run",
                          str(tiny_run), "--device", "cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines() == [f"{image}: {printed[0][0]}"]


@pytest.fixture(scope="module")
def shard_jpegs(tiny_shards, tiny_store, tmp_path_factory):
    """([3] JPEG files taken out of the first shard, [3] their store rows)."""
    import tarfile

    from pipeline.store import FeatureStore

    index = FeatureStore.open(tiny_store).index()
    out = tmp_path_factory.mktemp("jpegs")
    files, rows = [], []
    with tarfile.open(sorted(tiny_shards.glob("*.tar"))[0]) as tf:
        for member in (m for m in tf if m.name.endswith(".jpg")):
            key = member.name[: -len(".jpg")]
            if key in index.keys and len(files) < 3:
                files.append(out / member.name)
                files[-1].write_bytes(tf.extractfile(member).read())
                rows.append(int(index.rows[index.keys.index(key)]))
    assert len(files) == 3
    return files, rows


def test_captions_of_files_are_those_of_their_stored_features(captioner, tiny_store, shard_jpegs):
    """fp32: the rebuilt encoder gives the store's very features, so a file's caption is its
    store row's; batching and mixing paths with PIL images change nothing."""
    from PIL import Image

    from pipeline.store import FeatureStore

    files, rows = shard_jpegs
    feats = store_rows(FeatureStore.open(tiny_store), rows)  # [3, P, E] fp16
    n = dict(max_new_tokens=8)  # the tiny decoder rarely says EOS: short captions, a fast test
    want = captioner.caption_features(torch.from_numpy(feats), batch_size=2, **n)
    assert captioner.caption_features(feats, **n) == want  # numpy too, one batch
    mixed = [files[0], Image.open(files[1]), str(files[2])]
    assert captioner.caption(mixed, batch_size=2, **n) == want
    beam = captioner.caption_features(feats, beam_size=2, **n)
    assert captioner.caption(files, beam_size=2, **n) == beam
    assert torch.equal(captioner.encode(files), torch.from_numpy(feats))
    assert captioner.caption([]) == []


def test_features_of_another_shape_and_bad_settings_are_one_line(captioner):
    p, e = captioner.tokens, captioner.width
    for shape in ((2, p, e + 1), (p, e), (1, p - 1, e)):
        with pytest.raises(UserError, match=r"the decoder was trained on \[B, ") as err:
            captioner.caption_features(torch.zeros(shape))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="beam_size, max_new_tokens and batch_size must be >= 1"):
        captioner.caption_features(torch.zeros(1, p, e), beam_size=0)


def test_from_run_chooses_the_weights_and_refuses_a_missing_run(tiny_run, tmp_path):
    from pipeline import checkpoint
    from pipeline.api import Captioner

    last = Captioner.from_run(tiny_run, device="cpu", checkpoint="last").run
    assert last.chosen == "last" and last.ckpt == checkpoint.last(tiny_run / "checkpoints")
    older = sorted((tiny_run / "checkpoints").glob("step-*"))[0]
    named = Captioner.from_run(tiny_run, device="cpu", checkpoint=str(older)).run
    assert (named.chosen, named.ckpt, named.step) == ("path", older, int(older.name[5:]))
    with pytest.raises(UserError, match="no run folder"):
        Captioner.from_run(tmp_path / "nope", device="cpu")
    with pytest.raises(UserError, match="--checkpoint nope: not best, last"):
        Captioner.from_run(tiny_run, device="cpu", checkpoint="nope")
