"""The offline default source: seeded drawn scenes, their captions and references, the broken rows
and the url list (pipeline/loopback.py serves the images)."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from pipeline.captions import COLORS, POSITIONS, SHAPES, SIZES
# Read back through this module by tests/test_fetch.py; eval and metrics import pipeline.captions.


GENERATOR_VERSION = 3  # bump when drawings or captions change: images on disk are then redrawn
# Captions per image, in different phrasings (the first is the training caption), as in COCO.
N_REFERENCES = 5

BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
FAULTS = ("404", "html", "truncated")  # how a broken row fails when fetched

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (140, 60, 190), "pink": (245, 130, 190),
    "white": (250, 250, 250), "black": (20, 20, 20),
}
# Background colours are named with words outside COLORS, so that a caption's background never reads
# as an object's colour.
BG_RGB = {
    "grey": (128, 128, 128), "beige": (222, 208, 178), "cream": (240, 234, 214),
    "tan": (190, 160, 120), "slate": (90, 100, 115), "olive": (120, 125, 70),
    "teal": (60, 130, 130), "sand": (200, 185, 140), "lavender": (190, 180, 220),
    "mint": (180, 220, 195),
}
# radius / shortest side
SIZE_FRAC = {"small": (0.036, 0.046), "medium": (0.060, 0.074), "large": (0.094, 0.108)}
CANVAS_SIDES = (256, 272, 288)  # near square, so a centre crop keeps every position region


# --- scenes ---------------------------------------------------------------------------------------
@dataclass
class Row:
    index: int
    caption: str
    attributes: dict
    fault: Optional[str]  # None, or one of FAULTS
    references: tuple[str, ...] = ()  # N_REFERENCES captions; references[0] == caption

    @property
    def file(self) -> str:
        return f"{self.index:08d}.jpg"


def _region(x: float, y: float, w: int, h: int) -> str:
    col = min(int(3 * x / w), 2)
    row = min(int(3 * y / h), 2)
    return POSITIONS[3 * row + col]


def _contrast_ok(rgb, bg_colours) -> bool:
    return all(math.dist(rgb, BG_RGB[b]) > 110 for b in bg_colours)


_CLUSTER = {1: [(0.0, 0.0)], 2: [(-0.5, 0.0), (0.5, 0.0)],
            3: [(-0.5, 0.29), (0.5, 0.29), (0.0, -0.58)]}


def _place_group(rng, w, h, position, count, r):
    """Centres of `count` touching-but-apart objects whose centroid lies inside `position`'s third
    of the canvas, or None when they do not fit there."""
    pi = POSITIONS.index(position)
    row, col = divmod(pi, 3)
    s = 2.3 * r  # centre spacing: 0.3 r gap between neighbours
    offs = [(dx * s, dy * s) for dx, dy in _CLUSTER[count]]
    if count == 2 and rng.random() < 0.5:  # a vertical pair now and then
        offs = [(dy, dx) for dx, dy in offs]
    margin = 0.03 * min(w, h) + 1.2 * r
    lo_x = margin - min(o[0] for o in offs)
    hi_x = w - margin - max(o[0] for o in offs)
    lo_y = margin - min(o[1] for o in offs)
    hi_y = h - margin - max(o[1] for o in offs)
    cx0, cx1 = max(col * w / 3 + 2, lo_x), min((col + 1) * w / 3 - 2, hi_x)
    cy0, cy1 = max(row * h / 3 + 2, lo_y), min((row + 1) * h / 3 - 2, hi_y)
    if cx0 > cx1 or cy0 > cy1:
        return None
    # sample in the middle half of what is allowed so the region is unambiguous
    cx = cx0 + (cx1 - cx0) * rng.uniform(0.25, 0.75)
    cy = cy0 + (cy1 - cy0) * rng.uniform(0.25, 0.75)
    return [(cx + ox, cy + oy) for ox, oy in offs]


def _radius(rng, size, w, h) -> float:
    lo, hi = SIZE_FRAC[size]
    return float(rng.uniform(lo, hi) * min(w, h))


def make_scene(rng: np.random.Generator) -> dict:
    """One image's ground truth: canvas, background, 1-3 object groups (the first is primary)."""
    w, h = int(rng.choice(CANVAS_SIDES)), int(rng.choice(CANVAS_SIDES))
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    names = list(BG_RGB)
    bg = [names[int(rng.integers(len(names)))]]
    if kind in ("gradient", "stripes"):
        bg.append(rng.choice([n for n in names if n != bg[0]]).item())
    palette = [c for c in COLORS if _contrast_ok(RGB[c], bg)]
    background = {"kind": kind, "colours": bg, "seed": int(rng.integers(2**31)),
                  "orientation": ["horizontal", "vertical", "diagonal"][int(rng.integers(3))],
                  "period": int(rng.integers(10, 26))}
    while True:  # rejection: big clusters do not fit every corner
        count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        size = SIZES[int(rng.integers(3))]
        position = POSITIONS[int(rng.integers(9))]
        r = _radius(rng, size, w, h)
        centres = _place_group(rng, w, h, position, count, r)
        if centres is not None:
            break
    colour = palette[int(rng.integers(len(palette)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    objects = [{"x": round(x, 1), "y": round(y, 1), "r": round(r, 1)} for x, y in centres]
    groups = [{"colour": colour, "shape": shape, "size": size, "position": position, "count": count,
               "objects": objects}]
    if count == 1:
        n_extra = int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15]))
    else:
        n_extra = int(rng.random() < 0.4) if count == 2 else 0
    taken = [(o["x"], o["y"], o["r"]) for o in objects]
    used_positions = {position}
    for _ in range(n_extra):
        for _try in range(20):
            c2 = palette[int(rng.integers(len(palette)))]
            s2 = SHAPES[int(rng.integers(len(SHAPES)))]
            if (c2, s2) == (colour, shape):
                continue  # a second group of the primary's kind would make "count" ambiguous
            z2 = SIZES[int(rng.integers(3))]
            p2 = POSITIONS[int(rng.integers(9))]
            if p2 in used_positions:
                continue
            r2 = _radius(rng, z2, w, h)
            cen = _place_group(rng, w, h, p2, 1, r2)
            if cen is None:
                continue
            (x2, y2), = cen
            if all(math.dist((x2, y2), (x, y)) > 1.25 * (r2 + rr) + 4 for x, y, rr in taken):
                taken.append((x2, y2, r2))
                used_positions.add(p2)
                obj = {"x": round(x2, 1), "y": round(y2, 1), "r": round(r2, 1)}
                groups.append({"colour": c2, "shape": s2, "size": z2, "position": p2, "count": 1,
                               "objects": [obj]})
                break
    return {"version": GENERATOR_VERSION, "width": w, "height": h, "background": background,
            "groups": groups}


# --- drawing --------------------------------------------------------------------------------------
def _background(bg: dict, w: int, h: int) -> np.ndarray:
    """[h, w, 3] uint8. Built from 1-D ramps and broadcasting: drawing 5k images must take seconds,
    not minutes."""
    c0 = np.array(BG_RGB[bg["colours"][0]], np.int16)
    if bg["kind"] == "solid":
        return np.broadcast_to(c0.astype(np.uint8), (h, w, 3)).copy()
    if bg["kind"] == "noise":
        rng = np.random.default_rng(bg["seed"])
        noise = rng.integers(0, 81, (h, w, 3), dtype=np.int16) - 40  # grain: uniform +-40 a channel
        return np.clip(c0 + noise, 0, 255).astype(np.uint8)
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    coord = {"horizontal": ys, "vertical": xs,
             "diagonal": (xs + ys) // 2}[bg["orientation"]]  # [h|1, w|1]
    c1 = np.array(BG_RGB[bg["colours"][1]], np.float32)
    k = np.arange(int(coord.max()) + 1)[:, None]
    if bg["kind"] == "gradient":
        lut = c0 + (c1 - c0) * (k / max(int(k[-1, 0]), 1))  # one colour per coordinate value
    else:  # stripes
        lut = np.where((k // bg["period"]) % 2 == 1, c1, c0)
    return np.ascontiguousarray(np.broadcast_to(lut.astype(np.uint8)[coord], (h, w, 3)))


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        a = 0.9 * r
        return [(x - a, y - a), (x + a, y - a), (x + a, y + a), (x - a, y + a)]
    if shape == "diamond":
        a = 1.2 * r
        return [(x, y - a), (x + 0.8 * a, y), (x, y + a), (x - 0.8 * a, y)]
    if shape == "triangle":
        a = 1.2 * r
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        return [(x + a * math.cos(t), y + a * math.sin(t)) for t in angles]
    if shape == "hexagon":
        return [(x + r * math.cos(k * math.pi / 3), y + r * math.sin(k * math.pi / 3))
                for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = 1.25 * r if k % 2 == 0 else 0.5 * r
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((x + a * math.cos(t), y + a * math.sin(t)))
        return pts
    raise ValueError(shape)


def render(attributes: dict, quality: int = 90) -> bytes:
    """The JPEG bytes of a scene (deterministic given its attributes)."""
    w, h = attributes["width"], attributes["height"]
    img = Image.fromarray(_background(attributes["background"], w, h), "RGB")
    draw = ImageDraw.Draw(img)
    for g in attributes["groups"]:
        fill = RGB[g["colour"]]
        for o in g["objects"]:
            x, y, r = o["x"], o["y"], o["r"]
            if g["shape"] == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            else:
                draw.polygon(_polygon(g["shape"], x, y, r), fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --- captions -------------------------------------------------------------------------------------
_SIZE_WORDS = {"small": ["small", "small", "tiny", "little"],
               "medium": ["medium", "medium-sized", "mid-sized"],
               "large": ["large", "large", "big"]}
_POS_PHRASES = {
    "corner": ["in the {v} {h} corner", "at the {v} {h}", "in the {vv} {h} corner",
               "towards the {v}-{h} corner"],
    "top": ["at the top", "near the top", "along the top edge", "in the upper part"],
    "bottom": ["at the bottom", "near the bottom", "along the bottom edge", "in the lower part"],
    "left": ["on the left", "on the left side", "to the left", "on the left-hand side"],
    "right": ["on the right", "on the right side", "to the right", "on the right-hand side"],
    "centre": ["in the centre", "in the center", "in the middle", "at the centre"],
}
_BG_PHRASES = {
    "solid": ["a plain {c} background", "a solid {c} background", "a plain background",
              "a flat {c} backdrop"],
    "gradient": ["a gradient background", "a {c} to {c2} gradient", "a softly shaded background",
                 "a {c} gradient backdrop"],
    "noise": ["a noisy background", "a grainy {c} background", "a speckled background",
              "a noisy {c} backdrop"],
    "stripes": ["a striped background", "a background of {o} stripes", "a stripy {c} backdrop",
                "{c} and {c2} stripes"],
}
_JOIN = [" and ", ", and ", " as well as ", " plus ", " along with "]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng, g: dict) -> str:
    size = _pick(rng, _SIZE_WORDS[g["size"]])
    shape = g["shape"] if g["count"] == 1 else g["shape"] + "s"
    if g["shape"] == "circle" and rng.random() < 0.15:
        shape = shape.replace("circle", "disc")
    words = f"{size} {g['colour']} {shape}"
    if g["count"] == 1:
        det = _pick(rng, [_article(size), _article(size), "one", "a single"])
    elif g["count"] == 2:
        det = _pick(rng, ["two", "two", "a pair of"])
    else:
        det = "three"
    return f"{det} {words}"


def _position_phrase(rng, position: str) -> str:
    if " " in position:
        v, h = position.split()
        vv = {"top": "upper", "bottom": "lower"}[v]
        return _pick(rng, _POS_PHRASES["corner"]).format(v=v, h=h, vv=vv)
    return _pick(rng, _POS_PHRASES[position])


def _background_phrase(rng, bg: dict) -> str:
    cols = bg["colours"] + bg["colours"][:1]
    return _pick(rng, _BG_PHRASES[bg["kind"]]).format(c=cols[0], c2=cols[1], o=bg["orientation"])


def make_caption(rng: np.random.Generator, attributes: dict) -> str:
    """A Conceptual-Captions-like lowercase caption; the primary group is named first, with the
    first position."""
    groups = attributes["groups"]
    g0 = groups[0]
    np0, pos0 = _noun_phrase(rng, g0), _position_phrase(rng, g0["position"])
    others = [f"{_noun_phrase(rng, g)} {_position_phrase(rng, g['position'])}" for g in groups[1:]]
    rest = "".join(_pick(rng, _JOIN) + o for o in others)
    with_rest = (", with " + " and ".join(others)) if others else ""
    bg = _background_phrase(rng, attributes["background"])
    be, sit = ("are", "sit") if g0["count"] > 1 else ("is", "sits")
    templates = [
        f"{np0} {pos0}{rest} on {bg}",
        f"a photo of {np0} {pos0}{rest} against {bg}",
        f"{pos0}, {np0}{rest}, on {bg}",
        f"{bg} with {np0} {pos0}{rest}",
        f"there {be} {np0} {pos0}{rest}, on {bg}",
        f"an illustration of {np0} {pos0}{rest} over {bg}",
        f"{np0} {sit} {pos0} of {bg}{with_rest}",
        f"{np0} drawn {pos0}{rest} on {bg}",
        f"{bg}; {np0} can be seen {pos0}{rest}",
    ]
    return _pick(rng, templates)


# --- rows -----------------------------------------------------------------------------------------
def make_row(seed: int, index: int) -> tuple[dict, str]:
    """Attributes and caption of row `index`: independent of the data set's size, so row i is the
    same in any run."""
    rng = np.random.default_rng([seed, index])
    attributes = make_scene(rng)
    return attributes, make_caption(rng, attributes)


def make_references(seed: int, index: int) -> list[str]:
    """The N_REFERENCES reference captions of row `index`: the training caption first, then others
    drawn from their own streams (so the first caption and the image stay what they are without the
    rest)."""
    attributes, first = make_row(seed, index)
    refs = [first]
    for k in range(1, N_REFERENCES):
        rng = np.random.default_rng([seed, index, k])
        for _ in range(8):  # a different phrasing when one is to be had
            c = make_caption(rng, attributes)
            if c not in refs:
                break
        refs.append(c)
    return refs


def fault_plan(seed: int, count: int, broken_fraction: float) -> dict[int, str]:
    """Which rows are broken on purpose: exactly round(count * fraction) of them, cycling through
    FAULTS."""
    n = int(round(count * broken_fraction))
    if n <= 0:
        return {}
    rng = np.random.default_rng([seed, 2**31 - 1])
    picked = rng.choice(count, size=min(n, count), replace=False)
    return {int(i): FAULTS[j % len(FAULTS)] for j, i in enumerate(sorted(picked.tolist()))}


def make_rows(seed: int, count: int, broken_fraction: float) -> list[Row]:
    faults = fault_plan(seed, count, broken_fraction)
    rows = []
    for i in range(count):
        attributes, _ = make_row(seed, i)
        refs = make_references(seed, i)
        rows.append(Row(i, refs[0], attributes, faults.get(i), tuple(refs)))
    return rows


# --- on disk --------------------------------------------------------------------------------------
def _render_to(args) -> None:
    seed, index, path = args
    attributes, _ = make_row(seed, index)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(render(attributes))
    os.replace(tmp, path)


def generate(root: Path, seed: int, count: int, broken_fraction: float, processes: int = 1,
             progress=None) -> list[Row]:
    """Draw every missing image under root/images (reusing those of an earlier run with the same
    seed)."""
    images = root / "images"
    manifest_path = root / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    other = old and (old.get("seed") != seed or old.get("version") != GENERATOR_VERSION)
    if other and images.exists():
        for p in images.glob("*.jpg"):  # another seed's drawings: never mix them with ours
            p.unlink()
    images.mkdir(parents=True, exist_ok=True)
    rows = make_rows(seed, count, broken_fraction)
    have = {p.name for p in images.iterdir()}
    todo = [(seed, r.index, str(images / r.file)) for r in rows if r.file not in have]
    _draw(todo, processes, progress)
    manifest = {"version": GENERATOR_VERSION, "seed": seed, "count": count,
                "broken_fraction": broken_fraction,
                "broken": sum(r.fault is not None for r in rows),
                "images": len(list(images.glob("*.jpg")))}
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return rows


def _draw(todo: list[tuple[int, int, str]], processes: int, progress) -> None:
    """Render (seed, index, path) jobs, in `processes` spawned workers when there are enough."""
    task = progress.add_task("drawing synthetic images", total=len(todo), unit="img") \
        if progress and todo else None
    if todo and processes > 1 and len(todo) >= 400:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing as mp

        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as ex:
            for _ in ex.map(_render_to, todo, chunksize=64):
                if task is not None:
                    progress.advance(task)
    else:
        for t in todo:
            _render_to(t)
            if task is not None:
                progress.advance(task)


def url_for(base_url: str, row: Row) -> str:
    route = {None: "img", "404": "missing", "html": "html", "truncated": "truncated"}[row.fault]
    return f"{base_url}/{route}/{row.file}"


def write_url_list(path: Path, rows: list[Row], base_url: str) -> None:
    """caption, url, attributes and references (JSON strings) as parquet, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "caption": [r.caption for r in rows],
        "url": [url_for(base_url, r) for r in rows],
        "attributes": [json.dumps(r.attributes, separators=(",", ":")) for r in rows],
        "references": [json.dumps(list(r.references or (r.caption,))) for r in rows],
    })
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
