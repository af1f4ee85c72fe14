"""The fetch stage end to end: real img2dataset, a loopback server, WebDataset shards read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from pipeline import synthetic
from pipeline.config import FetchConfig
from stages import fetch


def _read_shards(shards: Path) -> list[tuple]:
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    return list(ds)


def _stats(shards: Path) -> dict[str, dict]:
    return {p.name[:5]: json.loads(p.read_text()) for p in sorted(shards.glob("*_stats.json"))}


def test_synthetic_shards_read_back(tiny_shards):
    samples = _read_shards(tiny_shards)
    stats = _stats(tiny_shards)
    assert sorted(stats) == ["00000", "00001", "00002"]
    assert sum(s["count"] for s in stats.values()) == 96
    assert len(samples) == sum(s["successes"] for s in stats.values())
    # exactly round(96 * 3%) = 3 rows are broken on purpose, one of each kind
    assert len(samples) == 93
    reasons = [m for s in stats.values() for m in s["status_dict"] if m != "success"]
    assert any("404" in m for m in reasons) and any("IncompleteRead" in m for m in reasons)
    assert any("decod" in m for m in reasons)
    for key, img, caption, meta in samples:
        assert min(img.size) == 256  # shortest side resized to 256: a 224 centre crop fits
        assert meta["caption"] == caption and meta["key"] == key
        attrs = json.loads(meta["attributes"])
        assert synthetic.parse_caption(caption) == synthetic.primary_attributes(attrs)
    # per shard: the tar holds exactly that shard's successes
    for name, s in stats.items():
        assert len(_read_shards_one(tiny_shards / f"{name}.tar")) == s["successes"]


def _read_shards_one(tar: Path) -> list:
    return list(wds.WebDataset(str(tar), shardshuffle=False))


def test_synthetic_colours_survive_the_fetch(tiny_shards):
    """The primary group's colour is really drawn: the image holds pixels close to it."""
    import numpy as np

    for _, img, _, meta in _read_shards(tiny_shards)[:12]:
        attrs = json.loads(meta["attributes"])
        want = np.array(synthetic.RGB[attrs["groups"][0]["colour"]], np.float32)
        dist = np.linalg.norm(np.asarray(img, np.float32) - want, axis=-1)
        assert (dist < 40).mean() > 0.002
