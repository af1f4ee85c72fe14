"""COCO caption metrics: hand-computed values, and agreement with pycocoevalcap's scorers called
directly."""

from __future__ import annotations

import json
import math

import pytest

from pipeline import metrics
from pipeline.captions import COLORS, SHAPES, parse_caption

REFS = {
    "a": ["A red circle, on the left.", "a small red circle"],
    "b": ["Two blue squares at the top."],
    "c": ["a large green triangle in the middle", "one green triangle"],
    "d": ["three yellow stars on the right"],
}
SETS = {
    "identical": {"a": "a red circle on the left", "b": "two blue squares at the top",
                  "c": "a large green triangle in the middle",
                  "d": "three yellow stars on the right"},
    "partial": {"a": "a red circle", "b": "two red squares", "c": "a green triangle", "d": ""},
    "disjoint": {"a": "zebra", "b": "zebra", "c": "zebra", "d": "zebra"},
}


# The COCO scorers start Java processes (the PTB tokenizer, METEOR): those tests are in the slow
# tier.
java = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    """One call for every set: one tokenizer JVM and one METEOR JVM, as the eval stage does it."""
    return metrics.coco_metrics_many(REFS, SETS)


@java
def test_identical_captions_score_one(ours):
    s = ours["identical"]
    for m in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"):
        assert s[m] == pytest.approx(1.0, abs=1e-6), m
    assert s["CIDEr"] > 1.0


@java
def test_disjoint_captions_score_zero(ours):
    s = ours["disjoint"]
    for m in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert s[m] == pytest.approx(0.0, abs=1e-6), m


@java
def test_hand_computed_bleu_and_rouge():
    # hyp "a red circle" vs ref "a red circle on the left" (punctuation and case removed by the PTB
    # tokenizer): unigram precision 1, brevity penalty exp(1 - 6/3); ROUGE-L: LCS 3, P 1, R 0.5,
    # beta 1.2.
    s = metrics.coco_metrics({1: ["A red circle, on the left."]}, {1: "A red circle."},
                             meteor=False)
    assert s["Bleu_1"] == pytest.approx(math.exp(-1), abs=1e-6)
    beta2 = 1.2**2
    assert s["ROUGE_L"] == pytest.approx((1 + beta2) * 1 * 0.5 / (0.5 + beta2 * 1), abs=1e-6)
    assert "METEOR" not in s  # skipped on request (saves a JVM start)


@java
def test_ptb_tokenize_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sents = ["A red circle, on the left.", "Don't (really) say: \"no\"!", "", "x  y\tz",
             "Dr. Smith's 3.5-inch cat..."]
    theirs = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sents)})
    assert metrics.ptb_tokenize(sents) == [theirs[i][0] for i in range(len(sents))]


@java
def test_matches_pycocoevalcap_scorers_called_directly(ours):
    """The documented recipe (PTBTokenizer, then each scorer's compute_score) must give the same
    numbers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFS.items()})
    meteor = Meteor()
    for name, hyps in SETS.items():
        res = tok.tokenize({i: [{"caption": h}] for i, h in hyps.items()})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        expected = dict(zip(metrics.METRICS, [*bleu, meteor.compute_score(gts, res)[0],
                                              Rouge().compute_score(gts, res)[0],
                                              Cider().compute_score(gts, res)[0]]))
        for m in metrics.METRICS:
            assert ours[name][m] == pytest.approx(expected[m], rel=1e-9, abs=1e-12), (name, m)
    # and the sets really differ, so agreement above is not vacuous
    assert ours["partial"]["CIDEr"] != pytest.approx(ours["identical"]["CIDEr"])


def test_mismatched_ids_are_refused():
    with pytest.raises(ValueError, match="other ids"):
        metrics.coco_metrics_many(REFS, {"x": {"a": "a red circle"}})


def test_attribute_accuracy_on_synthetic_captions():
    from pipeline import synthetic

    rows = [synthetic.make_row(7, i) for i in range(40)]
    attrs = {i: json.dumps(a) for i, (a, _) in enumerate(rows)}
    truth = {i: c for i, (_, c) in enumerate(rows)}
    every_one = {a: 1.0 for a in (*metrics.ATTRIBUTES, "all")}
    assert metrics.attribute_accuracy(truth, attrs) == every_one
    # every caption with its primary colour swapped: colour always wrong, the rest untouched
    swapped = {}
    for i, c in truth.items():
        cands, own = metrics.attribute_candidates(c, "colour")
        swapped[i] = cands[(own + 1) % len(cands)]
    acc = metrics.attribute_accuracy(swapped, attrs)
    assert acc["colour"] == 0.0 and acc["all"] == 0.0
    assert all(acc[a] == 1.0 for a in ("shape", "size", "position", "count"))
    assert metrics.attribute_accuracy({0: "nothing to see here"}, {0: attrs[0]})["shape"] == 0.0


def test_attribute_candidates_edit_the_primary_object():
    cap = "a plain white background with two small red discs at the top"
    cands, own = metrics.attribute_candidates(cap, "colour")
    assert cands[own] == cap and len(cands) == len(COLORS)
    assert [parse_caption(c)["colour"] for c in cands] == list(COLORS)
    # the background's colour is not the object's
    assert all("white background" in c for c in cands)
    cands, own = metrics.attribute_candidates(cap, "shape")
    assert cands[own] == cap
    assert "two small red hexagons at the top" in cands[SHAPES.index("hexagon")]
    assert [parse_caption(c)["shape"] for c in cands] == list(SHAPES)
    assert metrics.attribute_candidates("a photo of nothing", "colour") is None


def _group(colour, shape="circle", size="small", position="top", count=1):
    return {"colour": colour, "shape": shape, "size": size, "position": position, "count": count}


def test_ceiling_counts_look_alike_single_objects():
    scenes = [
        # a single primary beside two other singles: a perfect eye picks the colour two of the three
        # share
        {"groups": [_group("red", position="top"), _group("red", "star", position="left"),
                    _group("blue", position="right", size="large")]},
        # a pair is always the primary: the single beside it is no rival
        {"groups": [_group("green", count=2), _group("blue", "star")]},
    ]
    c = metrics.ceiling_accuracy(scenes)
    assert c["colour"] == pytest.approx((2 / 3 + 1) / 2)
    assert c["size"] == pytest.approx((2 / 3 + 1) / 2)
    assert c["position"] == pytest.approx((1 / 3 + 1) / 2)  # each single sits somewhere else
    assert c["count"] == 1.0 and c["shape"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.ceiling_accuracy([json.dumps(scenes[1])]) == {a: 1.0 for a in metrics.ATTRIBUTES}
    assert metrics.ceiling_accuracy([]) == {}


def test_caption_form_tells_whole_captions_from_word_salad():
    from pipeline import synthetic

    train = [c for _, c in (synthetic.make_row(3, i) for i in range(200))]
    seen = metrics.caption_bigrams(train)
    assert metrics.whole_share(train, seen) == 1.0  # every training caption is whole
    salad = "a photo ofsized green green the the the the the a a mint"
    nothing = {"all_five": False, "seen_bigrams": False, "whole": False}
    assert metrics.caption_form(salad, seen) == nothing
    # every attribute named, but a word pair no caption has
    broken = "a small red circle circle in the top left on a grey background"
    form = metrics.caption_form(broken, seen)
    assert form["all_five"] and not form["seen_bigrams"] and not form["whole"]
    assert metrics.whole_share([train[0], salad], seen) == 0.5
    assert metrics.whole_share([], seen) == 0.0
