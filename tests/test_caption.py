"""`pipeline caption`: new images through the run's own encoder, and the refusals (other encoder, not an image)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import PRECISIONS, store_rows

from pipeline.config import CaptionConfig
from test_evaluate import cli_error, run_copy


@pytest.fixture(scope="module")
def shard_jpeg(tiny_shards, tiny_store, tmp_path_factory):
    """(path of a JPEG taken out of the first shard, its key, its store row)."""
    from pipeline.store import FeatureStore

    index = FeatureStore.open(tiny_store).index()
    with tarfile.open(sorted(tiny_shards.glob("*.tar"))[0]) as tf:
        member = next(m for m in tf if m.name.endswith(".jpg"))
        data = tf.extractfile(member).read()
    key = member.name[: -len(".jpg")]
    path = tmp_path_factory.mktemp("img") / "some.jpg"
    path.write_bytes(data)
    return path, key, int(index.rows[index.keys.index(key)])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_caption_matches_the_store_features(precision, tiny_run, tiny_store, shard_jpeg, capsys):
    """Captioning the raw JPEG gives the caption of its cached features: same encoder, weights, preprocessing.

    fp32 (the store's and the run's precision): the very features and the very caption. bf16: the features
    within bf16 rounding of the store's, and the caption the decoder gives those bf16 features."""
    from conftest import BF16_FEATURES_CPU, feature_error

    from pipeline.devices import autocast
    from pipeline.encoder import build_encoder_from_provenance
    from pipeline.store import FeatureStore
    from PIL import Image
    from stages import caption
    from pipeline.trained_run import load_run

    path, key, row = shard_jpeg
    got = caption.run(CaptionConfig(images=[path], run=tiny_run, device="cpu", precision=precision))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"{path}: {got[0]}"] and got[0]

    store = FeatureStore.open(tiny_store)
    cached = store_rows(store, [row])  # [1, P, E] fp16
    prov = json.loads((tiny_run / "config.json").read_text())["store"]["encoder"]
    fresh = build_encoder_from_provenance(prov, precision=precision).encode_images([Image.open(path)])
    if precision == "fp32":
        np.testing.assert_array_equal(fresh, cached)
    else:
        rel, cos = feature_error(cached, fresh)
        assert 0 < rel <= BF16_FEATURES_CPU["rel_rms"] and cos >= BF16_FEATURES_CPU["min_cos"], (rel, cos)
    run = load_run(tiny_run, torch.device("cpu"))
    with autocast(torch.device("cpu"), precision):
        ids = run.decoder.generate(torch.from_numpy(fresh).float(), max_new_tokens=32)
    assert got == run.tokenizer.decode_batch(ids)


def test_caption_refuses_another_encoder(tiny_run, shard_jpeg, tmp_path, capsys, monkeypatch):
    def edit(c):  # the run claims its store came from other weights than the ones rebuilt now
        c["store"]["encoder"]["weights"]["state_sha256"] = "f" * 64

    run = run_copy(tiny_run, tmp_path / "run", edit)
    line = cli_error(["caption", str(shard_jpeg[0]), "--run", str(run)], capsys, monkeypatch)
    assert line.startswith("error: cannot rebuild the run's encoder") and "other weights than the store's" in line


def test_caption_refuses_a_non_image(tiny_run, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture\n")
    line = cli_error(["caption", str(bad), "--run", str(tiny_run)], capsys, monkeypatch)
    assert line == f"error: {bad} is not a readable image (UnidentifiedImageError)"
    line = cli_error(["caption", str(tmp_path / "missing.jpg"), "--run", str(tiny_run)], capsys, monkeypatch)
    assert line == f"error: {tmp_path / 'missing.jpg'}: no such file"


def test_cli_captions_are_the_apis_in_order(tiny_run, shard_jpeg, tmp_path):
    """`pipeline caption A B --beam-size 2` prints `path: caption` per image, in order: what
    Captioner.caption gives for the same files and settings."""
    import shutil

    from typer.testing import CliRunner

    from pipeline.api import Captioner
    from pipeline.cli import app

    other = tmp_path / "copy of it.jpg"
    shutil.copy(shard_jpeg[0], other)
    files = [shard_jpeg[0], other]
    opts = ["--beam-size", "2", "--max-new-tokens", "8", "--device", "cpu", "--precision", "fp32"]
    res = CliRunner().invoke(app, ["caption", *map(str, files), "--run", str(tiny_run), *opts])
    assert res.exit_code == 0, (res.output, res.exception)
    cap = Captioner.from_run(tiny_run, device="cpu", precision="fp32")
    want = cap.caption(files, beam_size=2, max_new_tokens=8)
    # stdout only: the random-init warning goes to stderr
    assert res.stdout.splitlines() == [f"{f}: {c}" for f, c in zip(files, want)]
    assert want[0] == want[1]


def test_caption_refuses_features_of_another_shape(tiny_run, shard_jpeg, tmp_path, capsys,
                                                   monkeypatch):
    def edit(c):  # the run says its store held one token fewer than the encoder gives
        c["store"]["tokens"] -= 1

    run = run_copy(tiny_run, tmp_path / "run", edit)
    line = cli_error(["caption", str(shard_jpeg[0]), "--run", str(run), "--device", "cpu"], capsys,
                     monkeypatch)
    p = json.loads((tiny_run / "config.json").read_text())["store"]["tokens"]
    assert line == (f"error: the rebuilt vit_tiny_patch16_224 gives [{p}, 192] features per image, "
                    f"the decoder was trained on [{p - 1}, 192]")


def test_caption_chooses_its_weights_as_eval_does(tiny_run, shard_jpeg, tmp_path):
    """`caption --checkpoint last` decodes with the newest checkpoint, as the API does with the same
    choice; a named checkpoint that does not exist is one line, never swapped for another."""
    from typer.testing import CliRunner

    from pipeline.api import Captioner
    from pipeline.cli import app

    opts = ["--run", str(tiny_run), "--max-new-tokens", "8", "--device", "cpu", "--precision", "fp32"]
    res = CliRunner().invoke(app, ["caption", str(shard_jpeg[0]), "--checkpoint", "last", *opts])
    assert res.exit_code == 0, (res.output, res.exception)
    want = Captioner.from_run(tiny_run, device="cpu", precision="fp32", checkpoint="last")
    line = f"{shard_jpeg[0]}: {want.caption([shard_jpeg[0]], max_new_tokens=8)[0]}"
    assert res.stdout.splitlines() == [line]
    missing = tmp_path / "no-such-checkpoint"
    res = CliRunner().invoke(app, ["caption", str(shard_jpeg[0]), "--checkpoint", str(missing), *opts])
    from pipeline.errors import UserError

    assert isinstance(res.exception, UserError) and "no-such-checkpoint" in str(res.exception)
    assert len(str(res.exception).splitlines()) == 1
