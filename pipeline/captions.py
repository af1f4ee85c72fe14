"""The synthetic captions' vocabulary, read back: a sample's ground truth and references from its
metadata, and a parser that finds the primary object's attributes in any caption (eval's attribute
accuracy)."""

from __future__ import annotations

import json
import re
from typing import Optional

COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
             "bottom right")  # the canvas's thirds, row by row
COUNT_WORDS = ("one", "two", "three")
ATTRIBUTES = ("colour", "shape", "size", "position", "count")  # of the primary group
VOCAB = {"colour": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS,
         "count": COUNT_WORDS}


# --- a sample's metadata --------------------------------------------------------------------------
def meta_attributes(meta: str) -> dict | None:
    """The synthetic ground truth in a sample's json metadata (its `attributes`), or None for real
    data."""
    try:
        m = json.loads(meta) if meta else {}
    except ValueError:
        return None
    a = m.get("attributes") if isinstance(m, dict) else None
    return a or None


def meta_references(meta: str, caption: str) -> list[str]:
    """The sample's reference captions (COCO style): the `references` its json carries (synthetic
    data: 5 phrasings, the training caption first), else the single caption (real lists)."""
    try:
        m = json.loads(meta) if meta else {}
        refs = m.get("references") if isinstance(m, dict) else None
        refs = json.loads(refs) if isinstance(refs, str) else refs
    except ValueError:
        refs = None
    if isinstance(refs, list) and refs and all(isinstance(r, str) and r.strip() for r in refs):
        return refs
    return [caption]


def primary_attributes(attributes: dict | str) -> dict[str, str]:
    """Ground-truth labels of the primary group: the group every caption names first (and places
    first).

    A group is 1-3 identical objects (same colour, shape and size) clustered in one of nine regions;
    `count` is the number of objects in that group (other objects in the image always differ in
    colour or shape, and are counted separately), written as a word from COUNT_WORDS. `position` is
    the region (thirds of the canvas) holding the group's centroid.
    """
    if isinstance(attributes, str):
        attributes = json.loads(attributes)
    g = attributes["groups"][0]
    return {"colour": g["colour"], "shape": g["shape"], "size": g["size"],
            "position": g["position"], "count": COUNT_WORDS[g["count"] - 1]}


# --- parsing any caption --------------------------------------------------------------------------
_COLOUR_SET = set(COLORS)
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "disc": "circle",
                "discs": "circle", "disk": "circle", "disks": "circle", "circles": "circle"}
_SIZE_PARSE = {"small": "small", "tiny": "small", "little": "small", "medium": "medium",
               "mid": "medium", "large": "large", "big": "large", "huge": "large"}
_COUNT_PARSE = {"a": "one", "an": "one", "one": "one", "single": "one", "two": "two", "pair": "two",
                "couple": "two", "both": "two", "three": "three"}
# words allowed inside a noun phrase ("a pair of", "medium-sized")
_NP_GLUE = {"of", "sized", "the"}
_POSITION_RE = re.compile(r"\b(?:(top|upper|bottom|lower) (left|right)|(left|right)"
                          r"|(top|upper|bottom|lower)|(centre|center|middle))\b")
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}


def words(text: str) -> list[str]:
    """The lower-case words of `text` (hyphens split words: "medium-sized" -> "medium", "sized")."""
    return re.findall(r"[a-z]+", text.lower().replace("-", " "))


def parse_position(text: str) -> Optional[str]:
    """The first position phrase in `text` as a POSITIONS label, or None."""
    m = _POSITION_RE.search(" ".join(words(text)))
    if not m:
        return None
    if m.group(1):
        return f"{_VERTICAL[m.group(1)]} {m.group(2)}"
    if m.group(3):
        return m.group(3)
    if m.group(4):
        return _VERTICAL[m.group(4)]
    return "centre"


def _noun_phrase(toks: list[str], noun: int) -> dict[str, Optional[str]]:
    """Colour, size and count of the noun phrase that ends at shape noun `toks[noun]`."""
    out: dict[str, Optional[str]] = {"colour": None, "size": None}
    counts = []
    j = noun - 1
    while j >= 0 and (toks[j] in _COLOUR_SET or toks[j] in _SIZE_PARSE or toks[j] in _COUNT_PARSE
                      or toks[j] in _NP_GLUE):
        w = toks[j]
        if w in _COLOUR_SET and out["colour"] is None:
            out["colour"] = w
        elif w in _SIZE_PARSE and out["size"] is None:
            out["size"] = _SIZE_PARSE[w]
        elif w in _COUNT_PARSE:
            counts.append(_COUNT_PARSE[w])
        j -= 1
    # "a pair of": the number word wins over the article
    numbers = [c for c in counts if c != "one"] or counts
    t = toks[noun]
    plural = t.endswith("s") and t[:-1] in _SHAPE_WORDS
    out["count"] = numbers[0] if numbers else (None if plural else "one")
    return out


def parse_caption(text: str) -> dict[str, Optional[str]]:
    """Primary colour, shape, size, position and count named in any caption (None where absent).

    The primary object is the first shape noun; its colour, size and count come from the words right
    before it (the noun phrase), its position is the first position phrase in the caption. A plural
    noun without a number gives count None. Without any shape noun, the first colour / size / number
    words anywhere are used.
    """
    toks = words(text)
    out: dict[str, Optional[str]] = {k: None for k in ATTRIBUTES}
    out["position"] = parse_position(text)
    noun = next((i for i, t in enumerate(toks) if t in _SHAPE_WORDS), None)
    if noun is not None:
        return {**out, **_noun_phrase(toks, noun), "shape": _SHAPE_WORDS[toks[noun]]}
    # no shape noun (a garbled caption): the first colour, size and explicit number words anywhere
    out["colour"] = next((t for t in toks if t in _COLOUR_SET), None)
    out["size"] = next((_SIZE_PARSE[t] for t in toks if t in _SIZE_PARSE), None)
    explicit = ("one", "single", "two", "pair", "three")
    out["count"] = next((_COUNT_PARSE[t] for t in toks if t in explicit), None)
    return out
