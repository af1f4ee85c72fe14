"""Reading captions back: the parser on partial and garbled captions, the word splitter, a sample's
metadata."""

from __future__ import annotations

import json

import pytest

from pipeline import captions as C
from pipeline import synthetic as S


def test_primary_attributes_accepts_json_text():
    r = S.make_rows(1, 1, 0.0)[0]
    assert C.primary_attributes(json.dumps(r.attributes)) == C.primary_attributes(r.attributes)


@pytest.mark.parametrize("text,want", [
    ("", {}),
    ("two circles", {"shape": "circle", "count": "two"}),
    ("a photo of a large blue square in the top right corner",
     {"colour": "blue", "shape": "square", "size": "large", "position": "top right",
      "count": "one"}),
    ("A Pair of Tiny PINK Stars, upper-left", {"colour": "pink", "shape": "star", "size": "small",
                                              "position": "top left", "count": "two"}),
    ("a striped background with three hexagons", {"shape": "hexagon", "count": "three"}),
    ("big blue thing on the left", {"colour": "blue", "size": "large", "position": "left"}),
    ("red red red circles circles", {"colour": "red", "shape": "circle"}),
])
def test_parse_partial_and_garbled_captions(text, want):
    got = C.parse_caption(text)
    assert got == {k: want.get(k) for k in C.ATTRIBUTES}


def test_words_are_lower_case_and_split_at_hyphens_and_punctuation():
    assert C.words("A Medium-sized, RED disc.") == ["a", "medium", "sized", "red", "disc"]
    assert C.words("  3 -- ") == []


def test_meta_references_fall_back_to_the_caption():
    refs = ["a red circle", "one red disc"]
    assert C.meta_references(json.dumps({"references": refs}), "x") == refs
    # stored as text
    assert C.meta_references(json.dumps({"references": json.dumps(refs)}), "x") == refs
    for meta in ("", "not json", json.dumps({"references": []}),
                 json.dumps({"references": ["ok", " "]}),
                 json.dumps([1, 2])):
        assert C.meta_references(meta, "the caption") == ["the caption"]


def test_meta_attributes_are_the_synthetic_ground_truth_or_none():
    attributes = S.make_rows(2, 1, 0.0)[0].attributes
    assert C.meta_attributes(json.dumps({"attributes": attributes})) == attributes
    for meta in ("", "not json", json.dumps({"caption": "a real photo"}), json.dumps([1, 2])):
        assert C.meta_attributes(meta) is None
