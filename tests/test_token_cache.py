"""Caption tokens paid once: the store's token cache is reused, extended, kept apart per
tokenizer and max_len, rebuilt when damaged or mismatched, and a train run from the CLI
reuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import token_cache
from pipeline.loader import CaptionTokens
from pipeline.store import FeatureStore
from pipeline.tokenizer import Tokenizer, load_tokenizer

T, E, C = 1, 8, 16
ENC = {"model": "toy", "weights": {"kind": "random-init", "seed": 0}}


class Counting:
    """The real tokenizer, counting the captions it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.captions, self.calls = tok, 0, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_ids(self, captions, max_len):
        self.calls += 1
        self.captions += len(captions)
        return self.tok.encode_ids(captions, max_len)


def _captions(tag: str, n: int) -> list[str]:
    words = ["a", "red", "circle", "on", "the", "blue", "square", "é", "left", "small"]
    return [f"{tag} " + " ".join(words[: 1 + (i * 7) % len(words)]) for i in range(n)]


def _write(st: FeatureStore, s: int, tag: str, n: int, captions: list[str] | None = None) -> None:
    caps = captions or _captions(tag, n)
    st.write_shard(s, np.ones((n, T, E), np.float16), [f"{tag}{i:03d}" for i in range(n)], caps,
                   [json.dumps({"i": i}) for i in range(n)])


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "f.zarr"
    st = FeatureStore.create(path, encoder=ENC, tokens=T, width=E, shard_capacity=C,
                             shards=["a", "b"])
    _write(st, 0, "a", 12)
    _write(st, 1, "b", 16)
    return path


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def _ids(store: Path, tok, max_len=16, **kw) -> token_cache.TokenIds:
    index = FeatureStore.open(store).index()
    return token_cache.caption_token_ids(index, tok, max_len, say=lambda m: None, **kw)


def _same_as_tokenising(got: token_cache.TokenIds, store: Path, tok, max_len=16) -> None:
    """Every batch the loader builds from these ids equals one from the captions tokenised now."""
    caps = FeatureStore.open(store).index().captions
    want, have = CaptionTokens(tok, caps, max_len), CaptionTokens.of(got.ids, got.lengths)
    pos = torch.arange(len(caps))
    for a, b in zip(want.batch(pos), have.batch(pos)):
        assert torch.equal(a, b)


def test_a_second_run_reads_the_cache_without_tokenising(store, gpt2):
    first = Counting(gpt2)
    got = _ids(store, first)
    assert got.cache == "built" and first.captions == 28
    again = Counting(gpt2)
    hit = _ids(store, again)
    assert hit.cache == "hit" and again.calls == 0
    assert np.array_equal(hit.ids, got.ids) and np.array_equal(hit.lengths, got.lengths)
    assert isinstance(hit.ids, np.memmap)  # mapped from the file, not copied into this process
    _same_as_tokenising(hit, store, gpt2)
    assert token_cache.lookup(FeatureStore.open(store).index(), gpt2, 16).cache == "hit"
    assert token_cache.lookup(FeatureStore.open(store).index(), gpt2, 17) is None


def test_another_tokenizer_or_max_len_makes_its_own(store, gpt2):
    from pipeline.tokenizer import _load_gpt2

    other_hf = _load_gpt2()
    other_hf.add_tokens(["<extra>"])
    other = Tokenizer(other_hf, "gpt2")  # the same name, another vocabulary
    assert _ids(store, gpt2).cache == "built"
    assert _ids(store, Counting(other)).cache == "built"
    short = _ids(store, gpt2, max_len=4)
    assert short.cache == "built" and short.lengths.max() == 4
    assert len(list((store / ".tokens").iterdir())) == 3
    for tok, max_len in ((gpt2, 16), (other, 16), (gpt2, 4)):
        counting = Counting(tok)
        assert _ids(store, counting, max_len).cache == "hit" and counting.calls == 0


def _folder(store: Path) -> Path:
    (folder,) = (store / ".tokens").iterdir()
    return folder


def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # inside the last caption's ids
    f.write_bytes(bytes(data))


DAMAGE = {
    "ids flipped": lambda d: _flip(next(d.glob("ids-*.npy"))),
    "lengths truncated": lambda d: (f := next(d.glob("lengths-*.npy"))).write_bytes(
        f.read_bytes()[:40]),
    "ids deleted": lambda d: next(d.glob("ids-*.npy")).unlink(),
    "manifest garbage": lambda d: (d / "manifest.json").write_bytes(b"{\xff"),
    "manifest of another max_len": lambda d: (d / "manifest.json").write_text(
        (d / "manifest.json").read_text().replace('"max_len": 16', '"max_len": 17')),
    "manifest claims another caption digest": lambda d: (d / "manifest.json").write_text(
        json.dumps({**(m := json.loads((d / "manifest.json").read_text())),
                    "shards": [[s, k, "0" * 32] for s, k, _ in m["shards"]]})),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_or_mismatched_cache_is_rebuilt_never_trusted(store, gpt2, case):
    _ids(store, gpt2)
    DAMAGE[case](_folder(store))
    notes, counting = [], Counting(gpt2)
    index = FeatureStore.open(store).index()
    got = token_cache.caption_token_ids(index, counting, 16, say=notes.append)
    assert got.cache == "built" and counting.captions == 28, case
    _same_as_tokenising(got, store, gpt2)
    if case != "manifest claims another caption digest":  # a digest that differs is a changed shard
        assert len(notes) == 1 and "tokenised again" in notes[0], notes
    assert _ids(store, Counting(gpt2)).cache == "hit"  # written again, whole
    assert sorted(p.suffix for p in _folder(store).iterdir()) == [".json", ".npy", ".npy"]


def test_an_extended_store_tokenises_only_its_new_rows(store, gpt2):
    _ids(store, gpt2)
    st = FeatureStore.open_for_write(store)
    st.extend(["c"])
    long = ["c " + "word " * 40]  # wider than every cached row: the cache grows a column
    _write(st, 2, "c", 5, long + _captions("c", 4))
    counting = Counting(gpt2)
    got = _ids(store, counting)
    assert got.cache == "extended" and counting.captions == 5
    _same_as_tokenising(got, store, gpt2)
    assert _ids(store, Counting(gpt2)).cache == "hit"
    # a shard written again with other captions: only it is tokenised again
    _write(FeatureStore.open_for_write(store), 0, "a", 12, _captions("z", 12))
    counting = Counting(gpt2)
    got = _ids(store, counting)
    assert got.cache == "extended" and counting.captions == 12
    _same_as_tokenising(got, store, gpt2)


def test_a_store_the_cache_cannot_be_written_into_tokenises_in_memory(store, gpt2):
    (store / ".tokens").write_text("not a folder")  # what a read-only store gives: mkdir fails
    notes = []
    index = FeatureStore.open(store).index()
    got = token_cache.caption_token_ids(index, gpt2, 16, say=notes.append)
    assert got.cache == "unwritable" and len(notes) == 1
    assert "cannot write the token cache" in notes[0]
    _same_as_tokenising(got, store, gpt2)


def test_ranks_other_than_0_never_write(store, gpt2):
    got = _ids(store, gpt2, write=False)
    assert got.cache == "not cached" and not (store / ".tokens").exists()


def test_a_cli_train_run_builds_then_reuses_the_cache_with_equal_losses(tiny_store, tmp_path):
    """The user's path: `pipeline train` twice on a copy of the tiny store (built, then hit), then
    with the cache damaged (rebuilt) and with no cache possible: every run's losses are the same."""
    from typer.testing import CliRunner

    from conftest import TINY_TRAIN, cli_options
    from pipeline import cli

    store = tmp_path / "features.zarr"
    shutil.copytree(tiny_store, store, ignore=shutil.ignore_patterns(token_cache.FOLDER))
    opts = cli_options({**TINY_TRAIN, "epochs": 1})

    def train(name: str) -> tuple[str, list]:
        argv = ["train", "--store", str(store), "--run", str(tmp_path / name), *opts]
        r = CliRunner().invoke(cli.app, argv)
        assert r.exit_code == 0, r.output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses = [{k: v for k, v in json.loads(x).items() if k.startswith("loss")} for x in lines]
        return summary["token_cache"], losses

    built, losses = train("a")
    assert built == "built" and losses
    assert train("b") == ("hit", losses)
    _flip(next(_folder(store).glob("ids-*.npy")))
    assert train("c") == ("built", losses)
    shutil.rmtree(store / token_cache.FOLDER)
    (store / token_cache.FOLDER).write_text("")
    assert train("d") == ("unwritable", losses)
