"""The synthetic source: determinism, captions that parse back to the ground truth, broken rows, the
server."""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.request
from collections import Counter

import pytest
from PIL import Image

from pipeline import captions as C
from pipeline import synthetic as S
from pipeline.loopback import serve


def test_rows_are_deterministic_and_independent_of_count():
    a = S.make_rows(seed=3, count=40, broken_fraction=0.0)
    b = S.make_rows(seed=3, count=80, broken_fraction=0.0)
    assert [(r.caption, r.attributes) for r in a] == [(r.caption, r.attributes) for r in b[:40]]
    c = S.make_rows(seed=4, count=40, broken_fraction=0.0)
    assert [r.caption for r in a] != [r.caption for r in c]
    assert S.render(a[0].attributes) == S.render(b[0].attributes)


def test_every_caption_parses_back_to_the_ground_truth():
    rows = [r for seed in range(6) for r in S.make_rows(seed, 500, 0.0)]
    for r in rows:
        truth = C.primary_attributes(r.attributes)
        assert set(truth) == set(C.ATTRIBUTES)
        assert all(truth[k] in C.VOCAB[k] for k in C.ATTRIBUTES)
        assert C.parse_caption(r.caption) == truth, r.caption
    # the vocabularies and phrasings are all in use
    for key in C.ATTRIBUTES:
        assert {C.primary_attributes(r.attributes)[key] for r in rows} == set(C.VOCAB[key])
    openings = Counter(" ".join(r.caption.split()[:2]) for r in rows)
    assert len({r.caption for r in rows}) > 0.95 * len(rows)
    for start in ("a photo", "there is", "there are", "an illustration"):
        assert openings[start] > 0, start
    assert any(", on " in r.caption for r in rows) and any("; " in r.caption for r in rows)
    assert {r.attributes["background"]["kind"] for r in rows} == set(S.BACKGROUNDS)
    assert {len(r.attributes["groups"]) for r in rows} == {1, 2, 3}
    # 1-3 objects per image; other groups never share the primary's colour and shape
    for r in rows:
        groups = r.attributes["groups"]
        assert 1 <= sum(g["count"] for g in groups) <= 3
        primary = (groups[0]["colour"], groups[0]["shape"])
        assert all((g["colour"], g["shape"]) != primary for g in groups[1:])


def test_position_label_matches_the_drawn_centroid():
    for r in S.make_rows(7, 300, 0.0):
        a = r.attributes
        for g in a["groups"]:
            xs = [o["x"] for o in g["objects"]]
            ys = [o["y"] for o in g["objects"]]
            centroid = (sum(xs) / len(xs), sum(ys) / len(ys))
            assert S._region(*centroid, a["width"], a["height"]) == g["position"]
            for o in g["objects"]:  # whole objects stay on the canvas
                assert 0 < o["x"] - 1.25 * o["r"] and o["x"] + 1.25 * o["r"] < a["width"]
                assert 0 < o["y"] - 1.25 * o["r"] and o["y"] + 1.25 * o["r"] < a["height"]


def test_fault_plan_is_exact_and_mixed():
    plan = S.fault_plan(0, 1000, 0.03)
    assert len(plan) == 30 and Counter(plan.values()) == {"404": 10, "html": 10, "truncated": 10}
    assert S.fault_plan(0, 1000, 0.0) == {}
    assert S.fault_plan(0, 1000, 0.03) == plan


def test_generate_reuses_images_and_serves_every_fault(tmp_path):
    rows = S.generate(tmp_path, seed=0, count=12, broken_fraction=0.25)
    files = sorted((tmp_path / "images").glob("*.jpg"))
    assert len(files) == 12 and json.loads((tmp_path / "manifest.json").read_text())["seed"] == 0
    mtimes = [f.stat().st_mtime_ns for f in files]
    S.generate(tmp_path, seed=0, count=12, broken_fraction=0.25)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # drawn once
    img = Image.open(files[0])
    assert min(img.size) >= 256 and img.format == "JPEG"

    faults = {r.fault: r for r in rows}
    assert set(faults) == {None, "404", "html", "truncated"}
    with serve(tmp_path / "images") as base:
        body = urllib.request.urlopen(S.url_for(base, faults[None]), timeout=5).read()
        assert Image.open(io.BytesIO(body)).format == "JPEG"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(S.url_for(base, faults["404"]), timeout=5)
        assert e.value.code == 404
        r = urllib.request.urlopen(S.url_for(base, faults["html"]), timeout=5)
        assert r.headers["Content-Type"] == "text/html" and b"<html" in r.read()
        with pytest.raises(http.client.IncompleteRead):
            urllib.request.urlopen(S.url_for(base, faults["truncated"]), timeout=5).read()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/img/../manifest.json", timeout=5)

    # another seed never mixes with the old drawings
    S.generate(tmp_path, seed=1, count=3, broken_fraction=0.0)
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 3


def test_five_references_describe_the_same_image():
    """COCO-style references: N_REFERENCES phrasings per image, the training caption first, each one
    true of the image (it parses back to the same primary object), mostly different from one
    another."""
    distinct = 0
    for i in range(200):
        refs = S.make_references(0, i)
        attributes, caption = S.make_row(0, i)
        assert len(refs) == S.N_REFERENCES == 5 and refs[0] == caption
        truth = C.primary_attributes(attributes)
        assert all(C.parse_caption(r) == truth for r in refs), refs
        distinct += len(set(refs))
    assert distinct > 0.9 * 200 * 5
    assert S.make_references(0, 7) == S.make_references(0, 7) != S.make_references(1, 7)
