"""What the default data allow at best: attribute ceilings, and the best one-pass parallel decoder (issue #13).

Two questions about the synthetic data itself, answered from the generator's ground truth (no features, no
model), on the default data set (`pipeline fetch` defaults: seed 0, 5,000 rows, the broken rows left out):

1. Attribute ceilings. The captions name the primary group first. When the primary is a single object and
   the image holds other single objects, nothing in the image says which one the captions name first, so a
   captioner that sees every object perfectly can expect at most `metrics.ceiling_accuracy`. To check that
   the draw really is symmetric, simple cues a captioner could use (the largest object first, the topmost,
   ...) are scored on those ambiguous images against the uniform guess, on a larger sample of scenes.

2. The best one-pass parallel decoder. CapPa's parallel rows put [MASK] at every position and score every
   position independently, so the loss is lowest for per-position marginals p(token at i | image); one pass
   decodes each position's argmax. The oracle here knows each image's true scene, draws `--samples`
   captions from the generator's caption distribution for it (`synthetic.make_caption`, the distribution the
   training and reference captions come from), and writes at each position the most frequent token of those
   captions that have a real token there (EOS included), cut at the first EOS, at the trainer's fixed length
   (the longest training caption). Its blind twin does the same with the captions of all images pooled (no
   image); between them, oracles that know only some of the primary group's attributes pool the captions
   of `--pool-rows` other scenes whose primary group agrees on those. All are scored as eval scores parallel decoding: attributes, whole captions
   (`metrics.caption_form`) and CIDEr against the 5 references.

    python scripts/ceilings.py --json docs/ceilings.json --out docs/ceilings.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import captions, metrics, synthetic  # noqa: E402
from pipeline.config import FetchConfig  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402

ATTRS = captions.ATTRIBUTES
TARGETS = {"greedy": {"colour": 0.95, "size": 0.80}, "parallel": {"colour": 0.80}}  # issue #13


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. attribute ceilings ---------------------------------------------------------------------------------
def _singles(scene: dict) -> list[dict] | None:
    """The single objects of an ambiguous scene (a single primary beside other singles), primary first."""
    g = scene["groups"]
    return g if g[0]["count"] == 1 and len(g) > 1 else None


def _central(scene):
    w, h = scene["width"], scene["height"]
    return lambda o: (o["x"] - w / 2) ** 2 + (o["y"] - h / 2) ** 2


CUES = {  # a rule that picks one of the single objects (objects: {"x", "y", "r"})
    "largest": lambda s: lambda o: -o["r"], "smallest": lambda s: lambda o: o["r"],
    "topmost": lambda s: lambda o: o["y"], "leftmost": lambda s: lambda o: o["x"], "most central": _central,
}


def cue_check(seed: int, count: int) -> dict:
    """On the ambiguous scenes of `count` drawn rows: how often each cue picks the primary (against the uniform
    1/|singles|), how often its pick shares the primary's colour and size (against `ceiling_accuracy` there),
    and the whole-data ceiling each cue would give (exact on the other scenes)."""
    picked, same = Counter(), {a: Counter() for a in ("colour", "size")}
    uniform, n, ambiguous = 0.0, 0, []
    for i in range(count):
        scene, _ = synthetic.make_row(seed, i)
        singles = _singles(scene)
        if singles is None:
            continue
        n += 1
        ambiguous.append(scene)
        uniform += 1 / len(singles)
        objs = [g["objects"][0] for g in singles]
        for cue, rule in CUES.items():
            key = rule(scene)
            j = min(range(len(objs)), key=lambda k: key(objs[k]))
            picked[cue] += j == 0
            for a in same:
                same[a][cue] += singles[j][a] == singles[0][a]
    share = n / count
    base = metrics.ceiling_accuracy(ambiguous)
    return {"rows": count, "ambiguous": n, "picks_primary": {"uniform": uniform / n, **{k: v / n for k, v in picked.items()}},
            "ceiling_with_cue": {a: {"uniform": 1 - share * (1 - base[a]),
                                     **{k: 1 - share * (1 - v / n) for k, v in same[a].items()}} for a in same}}


# --- 2. the best one-pass parallel decoder -------------------------------------------------------------------
def mode_caption(rows: list[list[int]], length: int, eos: int) -> list[int]:
    """Per position < length, the most frequent token among `rows` (ids + EOS) long enough to have one there."""
    out = []
    for j in range(length):
        here = Counter(r[j] for r in rows if len(r) > j)
        out.append(here.most_common(1)[0][0] if here else eos)
    return out


GIVEN = {  # what each oracle knows of an image: its whole scene, or only some of its primary group's attributes
    "scene": None,
    "colour, size, count, position": ("colour", "size", "count", "position"),
    "colour, shape, size, count": ("colour", "shape", "size", "count"),
    "colour, size, count": ("colour", "size", "count"), "colour": ("colour",), "nothing (blind)": (),
}


def _draw(rows, tok, samples: int, seed: int, max_len: int) -> dict[int, list[list[int]]]:
    """`samples` captions per row from the generator's caption distribution for its scene -> ids + EOS."""
    out = {}
    for r in rows:
        caps = [synthetic.make_caption(np.random.default_rng([seed, r.index, 99, j]), r.attributes)
                for j in range(samples)]
        out[r.index] = tok.encode_ids(caps, max_len)
    return out


def oracle_parallel(rows, pool_rows, tok, args, length: int) -> dict[str, list[str]]:
    """-> {oracle: one caption per row}. The "scene" oracle writes each position's mode over its own image's
    caption samples; the others over the samples of the `pool_rows` (other scenes than `rows`) whose primary
    group agrees with the row's on what they know, so they know nothing else of the image."""
    own = _draw(rows, tok, args.samples, args.seed, args.max_len)
    pooled = _draw(pool_rows, tok, args.pool_samples, args.seed + 2, args.max_len)
    out = {"scene": [tok.decode(mode_caption(own[r.index], length, tok.eos_id)) for r in rows]}
    for name, given in GIVEN.items():
        if given is None:
            continue

        def key(r):
            return tuple(captions.primary_attributes(r.attributes)[a] for a in given)
        pools = {}
        for r in pool_rows:
            pools.setdefault(key(r), []).extend(pooled[r.index])
        mode = {k: tok.decode(mode_caption(v, length, tok.eos_id)) for k, v in pools.items()}
        out[name] = [mode.get(key(r), "") for r in rows]  # "": no pooled scene agrees (scored as wrong)
    return out


def plot(res: dict, path: Path) -> None:
    """Left: chance, ceiling and the scene oracle's one-pass accuracy per attribute, with the targets.
    Right: each one-pass oracle's CIDEr against the blind one + 0.5 (the target's gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.2, 1]})
    x = np.arange(len(ATTRS))
    oracles = res["parallel_oracle"]["oracles"]
    bars = [("chance", res["chance"], "#bbbbbb"), ("ceiling (perfect eye)", res["ceiling"], "#4c72b0"),
            ("one-pass parallel, knowing the scene (and the primary)", oracles["scene"]["attributes"], "#dd8452")]
    for k, (label, vals, colour) in enumerate(bars):
        ax.bar(x + (k - 1) * 0.27, [vals[a] for a in ATTRS], 0.27, label=label, color=colour)
    for mode, tg in TARGETS.items():
        for a, v in tg.items():
            j = ATTRS.index(a)
            ax.hlines(v, j - 0.42, j + 0.42, colors="red" if mode == "greedy" else "purple", linestyles="--",
                      label=f"{mode} target" if a == "colour" else None)
    ax.set_xticks(x, ATTRS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (primary object)")
    ax.set_title(f"Attributes: what the default data allow ({res['rows']} images)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    names = [n for n in GIVEN if n in oracles]  # most to least informed (the JSON's keys are sorted)
    bx.barh(names, [oracles[n]["cider"] for n in names], color="#dd8452")
    goal = oracles["nothing (blind)"]["cider"] + 0.5
    bx.axvline(goal, color="purple", linestyle="--", label="blind + 0.5 (the target's gap)")
    bx.invert_yaxis()
    bx.set_xlabel("CIDEr, 5 references")
    bx.set_title("Best one-pass parallel CIDEr, by what it knows", fontsize=10)
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=FetchConfig.seed)
    ap.add_argument("--count", type=int, default=FetchConfig.count)
    ap.add_argument("--samples", type=int, default=200, help="captions drawn per image for the oracle")
    ap.add_argument("--oracle-rows", type=int, default=1000, help="images the oracle captions (the first ones)")
    ap.add_argument("--pool-rows", type=int, default=20_000, help="other scenes, pooled by the partial oracles")
    ap.add_argument("--pool-samples", type=int, default=10, help="captions drawn per pooled scene")
    ap.add_argument("--cue-rows", type=int, default=50_000, help="scenes drawn for the cue check")
    ap.add_argument("--max-len", type=int, default=77)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="PNG chart")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    rows = [r for r in synthetic.make_rows(args.seed, args.count, FetchConfig.broken_fraction) if r.fault is None]
    attrs = [r.attributes for r in rows]
    res = {"seed": args.seed, "rows": len(rows), "chance": metrics.chance_accuracy(attrs),
           "ceiling": metrics.ceiling_accuracy(attrs),
           "ambiguous_share": sum(_singles(a) is not None for a in attrs) / len(rows)}
    log(f"{len(rows)} images, {res['ambiguous_share']:.1%} ambiguous; ceiling {res['ceiling']}")
    res["cue_check"] = cue_check(args.seed + 1, args.cue_rows)  # other scenes than the data set's
    log(f"cue check: {res['cue_check']}")

    tok = load_tokenizer()
    length = max(len(tok.encode(r.caption, args.max_len)) for r in rows)  # the trainer's parallel_len
    part = rows[: args.oracle_rows]
    pool_rows = [synthetic.Row(i, "", synthetic.make_row(args.seed + 2, i)[0], None) for i in range(args.pool_rows)]
    caps = oracle_parallel(part, pool_rows, tok, args, length)
    seen = metrics.caption_bigrams(r.caption for r in rows)
    keys = [r.index for r in part]
    truth = {r.index: r.attributes for r in part}
    refs = {r.index: list(r.references) for r in part}
    coco = metrics.coco_metrics_many(refs, {k: dict(zip(keys, c)) for k, c in caps.items()}, meteor=False)
    res["parallel_oracle"] = {
        "rows": len(part), "samples_per_image": args.samples, "parallel_len": length,
        "pool_rows": args.pool_rows, "pool_samples": args.pool_samples,
        "ceiling_on_these_rows": metrics.ceiling_accuracy(list(truth.values())),
        "first_references": [refs[k][0] for k in keys[:5]],
        "oracles": {k: {"attributes": metrics.attribute_accuracy(dict(zip(keys, c)), truth),
                        "pooled_for": sum(map(bool, c)) / len(c),
                        "whole": metrics.whole_share(c, seen), "cider": coco[k]["CIDEr"], "first_captions": c[:5]}
                    for k, c in caps.items()},
    }
    for k, o in res["parallel_oracle"]["oracles"].items():
        log(f"oracle knowing {k}: whole {o['whole']:.3f}, CIDEr {o['cider']:.3f}, "
            + ", ".join(f"{a} {v:.2f}" for a, v in o["attributes"].items()))
        log(f"  {o['first_captions'][0]}")
    res["wall_s"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    if args.out:
        plot(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
