"""Caption metrics: COCO BLEU-1..4 / METEOR / ROUGE-L / CIDEr via pycocoevalcap, and synthetic
attribute accuracy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.captions import (ATTRIBUTES, COLORS, SHAPES, VOCAB, parse_caption, primary_attributes,
                               words)
from pipeline.errors import UserError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

Refs = Mapping[object, Sequence[str]]  # id -> reference captions (>= 1 each)
Hyps = Mapping[object, str]  # id -> one generated caption


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise UserError("COCO metrics need Java (the PTB tokenizer and METEOR are jars): "
                        "install a JRE, e.g. openjdk-17")
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Stanford PTB-tokenise and lower-case sentences, dropping punctuation, exactly as
    pycocoevalcap's PTBTokenizer.

    Same jar, flags and punctuation list as `PTBTokenizer.tokenize`, but: one JVM for every sentence
    of every caption set (JVM start-up dominates), and the temporary input file lives in a private
    temp dir, because the original writes it into site-packages (read-only in many installs, and
    racy between processes).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not sentences:
        return []
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    # -preserveLines keeps one output line per input line, so a caption must not contain a line
    # break.
    text = "\n".join(" ".join(s.split()) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text(text, encoding="utf-8")
        cmd = [_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase", str(src)]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=600)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        last = err[-1] if err else "no output"
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {last}")
    lines = proc.stdout.decode("utf-8").split("\n")
    out = [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS)
           for line in lines[: len(sentences)]]
    if len(out) != len(sentences):  # would silently misalign every score after the first lost line
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(sentences)} sentences")
    return out


def coco_metrics_many(refs: Refs, hyp_sets: Mapping[str, Hyps], *,
                      meteor: bool = True) -> dict[str, dict[str, float]]:
    """COCO metrics of several caption sets against the same references: name -> {metric: score}.

    `meteor=False` skips METEOR (and its JVM start-up); its key is then absent.

    Every set must caption exactly the ids of `refs`. One PTB tokenizer run and one METEOR JVM serve
    all sets (METEOR's start-up, mostly loading its paraphrase table, costs seconds). CIDEr is
    pycocoevalcap's CIDEr-D, whose document frequencies come from the evaluated references, so it
    needs several images to mean much.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(refs)
    if not ids:
        raise ValueError("no references to score against")
    for name, hyps in hyp_sets.items():
        if set(hyps) != set(ids):
            raise ValueError(f"caption set {name!r} covers other ids than the references")
    if any(len(refs[i]) == 0 for i in ids):
        raise ValueError("every id needs at least one reference caption")

    # Tokenise references and all sets in one JVM call, then cut the flat list back apart.
    flat = [r for i in ids for r in refs[i]] + [hyps[i] for hyps in hyp_sets.values() for i in ids]
    tok = iter(ptb_tokenize(flat))
    gts = {i: [next(tok) for _ in refs[i]] for i in ids}
    res_sets = {name: {i: [next(tok)] for i in ids} for name in hyp_sets}

    scorer = Meteor() if meteor else None
    try:
        results = {}
        for name, res in res_sets.items():
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = dict(zip(METRICS[:4], bleu))
            if scorer is not None:
                try:
                    scores["METEOR"], _ = scorer.compute_score(gts, res)
                except ValueError as e:  # an empty line from the jar means the JVM died
                    raise RuntimeError(f"METEOR (java) stopped answering: {e}") from e
            scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
            scores["CIDEr"], _ = Cider().compute_score(gts, res)
            results[name] = {m: float(scores[m]) for m in METRICS if m in scores}
        return results
    finally:
        if scorer is not None:
            _close_meteor(scorer)


def _close_meteor(meteor) -> None:
    """End the METEOR JVM now instead of at garbage collection (its __del__ may run at interpreter
    exit)."""
    p = meteor.meteor_p
    try:
        p.stdin.close()
    finally:
        p.kill()
        p.wait()
    # Its own __del__ later repeats this harmlessly: closing a closed pipe and killing a reaped
    # process are no-ops.


def coco_metrics(refs: Refs, hyps: Hyps, *, meteor: bool = True) -> dict[str, float]:
    """COCO metrics of one caption set: {Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr}."""
    return coco_metrics_many(refs, {"_": hyps}, meteor=meteor)["_"]


def attribute_accuracy(hyps: Hyps, attributes: Mapping[object, object]) -> dict[str, float]:
    """Per-attribute accuracy of generated captions against synthetic ground truth.

    `attributes[id]` is the sample's `attributes` metadata (a dict or its JSON text). The generated
    caption is parsed with `captions.parse_caption`, the truth reduced with
    `captions.primary_attributes`; an attribute the caption does not mention counts as wrong.
    Returns {attribute: accuracy in [0, 1], "all": every one right}.
    """
    ids = [i for i in hyps if i in attributes]
    if not ids:
        return {}
    right = {a: 0 for a in ATTRIBUTES}
    all_right = 0
    for i in ids:
        truth = primary_attributes(attributes[i])  # dict or JSON text
        got = parse_caption(hyps[i])
        ok = [got.get(a) is not None and got.get(a) == truth.get(a) for a in ATTRIBUTES]
        for a, hit in zip(ATTRIBUTES, ok):
            right[a] += hit
        all_right += all(ok)
    n = len(ids)
    return {**{a: right[a] / n for a in ATTRIBUTES}, "all": all_right / n}


def chance_accuracy(attributes) -> dict[str, float]:
    """The floor "names it by chance": per attribute, the accuracy of always naming its most
    frequent value in these samples (the best constant guess; uniform chance 1/|vocabulary| is
    lower). "all" is left out."""
    truths = [primary_attributes(a) for a in attributes]
    if not truths:
        return {}
    return {a: Counter(t.get(a) for t in truths).most_common(1)[0][1] / len(truths)
            for a in ATTRIBUTES}


def ceiling_accuracy(attributes) -> dict[str, float]:
    """The ceiling: per attribute, the best expected accuracy of a captioner that sees every object
    perfectly.

    The generator draws the primary group first and then extra single objects, and the captions name
    the primary first. When the primary is a single object too, nothing in the image says which of
    the single objects it is (the draw is near-symmetric: in `scripts/ceilings.py` the best cue, the
    largest, adds 0.002), so the best guess names the value most of them share: max_v |{g: g[attr] =
    v}| / |singles|. A group of two or three is always the primary (its ceiling is 1). "all" is left
    out."""
    out = {a: 0.0 for a in ATTRIBUTES}
    n = 0
    for a in attributes:
        a = json.loads(a) if isinstance(a, str) else a
        groups = a["groups"]
        # the primary's look-alikes (itself included)
        alike = [g for g in groups if g["count"] == groups[0]["count"]]
        labels = [primary_attributes({"groups": [g]}) for g in alike]
        for k in ATTRIBUTES:
            out[k] += Counter(t[k] for t in labels).most_common(1)[0][1] / len(labels)
        n += 1
    return {k: v / n for k, v in out.items()} if n else {}


def caption_form(caption: str, seen_bigrams: set) -> dict[str, bool]:
    """Is a generated caption whole? `all_five` = `parse_caption` finds every attribute (a shape
    noun with its colour, size, count, and a position phrase); `seen_bigrams` = every adjacent word
    pair also occurs in some training caption (catches "the the", "ofsized green"); `whole` =
    both."""
    got = parse_caption(caption)
    toks = words(caption)
    all_five = all(got.get(a) is not None for a in ATTRIBUTES)
    seen = len(toks) > 1 and all(p in seen_bigrams for p in zip(toks, toks[1:]))
    return {"all_five": all_five, "seen_bigrams": seen, "whole": all_five and seen}


def caption_bigrams(captions) -> set:
    """Every adjacent word pair of `captions` (the training captions, for `caption_form`)."""
    out = set()
    for c in captions:
        toks = words(c)
        out.update(zip(toks, toks[1:]))
    return out


def whole_share(captions, seen_bigrams: set) -> float:
    """The share of `captions` that are whole (`caption_form`)."""
    captions = list(captions)
    if not captions:
        return 0.0
    return sum(caption_form(c, seen_bigrams)["whole"] for c in captions) / len(captions)


def attribute_candidates(caption: str, key: str) -> tuple[list[str], int] | None:
    """The caption with its primary object's colour (or shape) word swapped for every word of that
    vocabulary.

    -> (candidates in `captions.VOCAB[key]` order, index of the caption's own word), or None when
    the caption has no "<colour> <shape>" phrase to edit. The primary object is the first shape noun
    (as `parse_caption` reads it), so a background colour named earlier ("a white background with a
    red star") is left alone. A plural shape stays plural. Used for zero-shot ranking: which
    candidate does the decoder find likeliest?
    """
    if key not in ("colour", "shape"):
        raise ValueError(f"candidates exist for colour and shape, not {key!r}")
    shapes = "|".join(sorted(SHAPES, key=len, reverse=True))
    colours = "|".join(COLORS)
    m = re.search(rf"\b({colours}) ({shapes}|disc|disk)(s?)\b", caption)
    if m is None:
        return None
    colour, noun, plural = m.groups()
    shape = {"disc": "circle", "disk": "circle"}.get(noun, noun)
    vocab = VOCAB[key]
    own = colour if key == "colour" else shape
    out = []
    for word in vocab:
        if key == "colour":
            phrase = f"{word} {noun}{plural}"
        else:  # the caption's own word is kept as written ("disc" stays "disc")
            phrase = f"{colour} {noun if word == shape else word}{plural}"
        out.append(caption[: m.start()] + phrase + caption[m.end():])
    return out, vocab.index(own)
