"""The eval report: PNG figures (loss curves, metric bars, captioned image grid) and a one-page report.md."""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from pathlib import Path

from pipeline.captions import ATTRIBUTES
from pipeline.metrics import METRICS
from pipeline.osutil import atomic_write_text
from pipeline.runlog import pyplot, save_figure

MODES = ("greedy", "beam", "parallel")
MODE_COLOURS = {"greedy": "tab:blue", "beam": "tab:green", "parallel": "tab:orange"}
# Captions, keys and names are drawn as they are: a `$` pair would otherwise be parsed as TeX (a
# model's `$$$` or a caption's invalid maths crashed the figure after eval's work), and usetex would
# run latex on them.
PLAIN = {"parse_math": False, "usetex": False}


# --- figures ---------------------------------------------------------------------------------------------------
def plot_metric_bars(coco: dict[str, dict[str, float]], path: Path) -> None:
    """COCO metrics per decoding mode, the model beside its blind (zeroed-image) baseline."""
    import numpy as np

    plt = pyplot()
    names = [m for m in METRICS if any(m in s for s in coco.values())]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [len(names) - 1, 1.3]})
    modes = [m for m in MODES if m in coco]
    w = 0.8 / max(2 * len(modes), 1)
    for ax, subset in ((axes[0], [n for n in names if n != "CIDEr"]), (axes[1], ["CIDEr"])):
        x = np.arange(len(subset))
        for j, mode in enumerate(modes):
            for k, (key, hatch, alpha) in enumerate(((mode, None, 0.9), (f"blind_{mode}", "//", 0.35))):
                if key not in coco:
                    continue
                vals = [coco[key].get(n, 0.0) for n in subset]
                ax.bar(x + (2 * j + k - len(modes) + 0.5) * w, vals, w, color=MODE_COLOURS[mode], alpha=alpha,
                       hatch=hatch, label=key.replace("_", " ") if ax is axes[0] else None)
        ax.set_xticks(x, [n.replace("_", "-") for n in subset], **PLAIN)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("COCO metrics: model (solid) vs blind baseline (hatched)", **PLAIN)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def plot_grid(samples: list[dict], images: list, path: Path, cols: int = 4) -> None:
    """Validation images with their reference and generated captions (an image may be None: not found).

    Each cell is a square image with a fixed text box below it, so long captions never run into the next row.
    """
    plt = pyplot()
    n = len(samples)
    rows = max(1, -(-n // cols))
    cw, img_h, txt_h = 4.2, 3.6, 2.0  # inches: cell width, image height, caption box height
    fig = plt.figure(figsize=(cw * cols, (img_h + txt_h) * rows))
    fw, fh = cw * cols, (img_h + txt_h) * rows
    for j, (s, im) in enumerate(zip(samples, images)):
        r, c = divmod(j, cols)
        top = fh - r * (img_h + txt_h)
        ax = fig.add_axes([(c * cw + 0.3) / fw, (top - img_h + 0.1) / fh, (cw - 0.6) / fw, (img_h - 0.35) / fh])
        ax.axis("off")
        if im is not None:
            ax.imshow(im)
        else:
            ax.text(0.5, 0.5, "(image not found)", ha="center", va="center", transform=ax.transAxes,
                    **PLAIN)
        ax.set_title(str(s.get("key", "")), fontsize=8, **PLAIN)
        lines = []
        for label in ("reference", *MODES):
            if s.get(label) is not None:  # shortened: an untrained decoder rambles for max_new_tokens
                room = 200 if label == "reference" else 120
                lines.append(textwrap.fill(textwrap.shorten(f"{label}: {s[label]}", room, placeholder=" …"), 52))
        fig.text((c * cw + 0.15) / fw, (top - img_h) / fh, "\n".join(lines), va="top", ha="left", fontsize=7,
                 family="monospace", **PLAIN)
    save_figure(fig, path)


def load_images(keys: list[str], rows: list[int], shard_names: list[str], capacity: int, shards_dir: Path | None,
                attributes: list | None = None, samples: list[dict] | None = None) -> tuple[list, list[str]]:
    """PIL images of store rows, read back from their WebDataset shard (`<shards_dir>/<shard>.tar`, `<key>.jpg`).

    `samples` ({"caption", "url"} per image, from the store) prove that a shard's `<key>.jpg` is the very
    sample that was encoded: another fetch's shards reuse the same shard names and keys, so a key alone
    would draw another image under this sample's caption. A sample whose `.txt` or `.json` url differs is
    "other". Falls back to redrawing synthetic samples from their attributes, else None for that image.
    -> (images, where each came from: "shard" | "redrawn" | "other" (redrawn where it can be) | "missing").
    """
    from PIL import Image

    out: list = [None] * len(keys)
    source = ["missing"] * len(keys)
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_shard.setdefault(shard_names[r // capacity], []).append(i)
    for shard, idx in by_shard.items():
        tar = Path(shards_dir or "") / (shard if shard.endswith(".tar") else f"{shard}.tar")
        if shards_dir is None or not tar.is_file():
            continue
        try:
            _read_shard_images(tar, {keys[i]: i for i in idx}, samples, out, source)
        except (OSError, tarfile.TarError, ValueError):
            continue  # a damaged shard only costs the grid its pictures
    if attributes is not None:
        from pipeline import synthetic

        for i, im in enumerate(out):
            if im is None and attributes[i]:
                a = attributes[i]
                try:
                    a = json.loads(a) if isinstance(a, str) else a
                    out[i] = Image.open(io.BytesIO(synthetic.render(a))).convert("RGB")
                    source[i] = "other" if source[i] == "other" else "redrawn"
                except (KeyError, TypeError, ValueError):
                    pass
    return out, source


def _read_shard_images(tar: Path, want: dict[str, int], samples: list[dict] | None, out: list,
                       source: list) -> None:
    """Fill out[i] / source[i] for the keys of `want` (key -> i) found in `tar`, checked against `samples`."""
    from PIL import Image

    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            key, _, ext = m.name.rpartition(".")
            if key in want and ext in ("jpg", "txt", "json") and m.isfile():
                files.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for key, parts in files.items():
        i = want[key]
        if "jpg" not in parts:
            continue
        if samples is not None and not _same_sample(parts, samples[i]):
            source[i] = "other"
            continue
        out[i] = Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
        source[i] = "shard"


def _same_sample(parts: dict[str, bytes], sample: dict) -> bool:
    """Whether a shard's sample files hold the caption (and url, where both know it) the store recorded."""
    caption = parts.get("txt", b"").decode("utf-8", "replace")
    if caption != sample.get("caption"):
        return False
    try:
        url = json.loads(parts["json"]).get("url") if "json" in parts else None
    except (ValueError, AttributeError):
        url = None
    return url is None or sample.get("url") is None or url == sample["url"]


# --- report.md -------------------------------------------------------------------------------------------------
def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def _parallel_note(st: dict) -> str:
    lp = st.get("parallel_len")
    note = (f"The parallel loss is CapPa's: every row is {lp} [MASK] inputs with full attention, scored on the "
            "caption's real tokens (EOS included). The model is not told the caption's length; it must predict "
            "where EOS goes, exactly as parallel decoding has to.")
    if st.get("parallel_len_recorded") is False:
        note += (" This run's config.json records no parallel_len (it predates fixed-length parallel rows): "
                 "max_len is assumed, and its parallel rows were trained otherwise, so its parallel numbers "
                 "are not comparable.")
    return note


def _baselines(res: dict) -> list[str]:
    """The decoder's autoregressive loss beside a text-only n-gram's: what it learnt beyond counting words."""
    ng = (res.get("baselines") or {}).get("ngram")
    if not ng:
        return []
    return ["## Baselines", "",
            f"A text-only {ng['order']}-gram language model (interpolated absolute discounting over the same GPT-2 "
            f"ids) counted on the {ng['train_captions']} training captions, scored like the decoder's "
            "autoregressive mode. Its most likely caption, written for every image, is scored in the tables below "
            "as `ngram`; the blind decoder columns are the image-free decoder.", "",
            *_table(["model", "autoregressive val loss (nats/token)", "caption"],
                    [["this decoder", _f(res["val_loss"].get("loss_ar")), "(per image)"],
                     [f"text-only {ng['order']}-gram", _f(ng.get("val_loss")), f"\"{ng.get('caption')}\""]]), ""]


def _banners(res: dict) -> list[str]:
    """Callouts above everything: one who only skims must see why the numbers may mean little."""
    enc = res["encoder"]
    L = []
    if res["encoder_random_init"]:
        L += ["> [!CAUTION]",
              f"> **RANDOM-INIT ENCODER.** The store's `{enc.get('model')}` was randomly "
              f"initialised (seed {enc.get('weights', {}).get('seed')}): no pretrained weights "
              "were available. Its features carry no visual knowledge, so these numbers say "
              "nothing about what a real CapPa decoder learns. Re-encode with `--weights hub` or "
              "`--weights PATH`.", ""]
    for line in res.get("warnings", []):
        L += ["> [!WARNING]", f"> **{line}.**", ""]
    return L


def _weights(w: dict) -> str:
    """Where the encoder's weights came from: enough to tell two stores apart (a short sha256)."""
    kinds = {"random-init": f"random-init (seed {w.get('seed')})",
             "file": f"file `{w.get('path')}` (sha256 `{str(w.get('sha256'))[:12]}`)",
             "hub": f"hub `{w.get('hub_id')}`"}
    return kinds.get(w.get("kind"), str(w.get("kind")))


def _provenance(res: dict) -> list[str]:
    """Which checkpoint, encoder, tokenizer and split produced the numbers below."""
    enc, ck, sp = res["encoder"], res["checkpoint"], res["split"]
    chosen = "the best epoch by validation loss" if ck.get("chosen") == "best" else "the newest"
    return ["## Provenance", "",
            f"- checkpoint: `{ck['dir']}` (step {ck['step']}, {chosen}); "
            f"decoder {res['decoder_summary']}",
            f"- encoder: `{enc.get('model')}`, weights {_weights(enc.get('weights', {}))}; "
            f"store `{res['store']}`",
            f"- tokenizer: `{res['tokenizer']['name']}` ({res['tokenizer']['vocab_size']} ids)",
            f"- validation split: {sp['val']} samples (val_fraction {sp['val_fraction']}), "
            f"{sp['captioned']} captioned; "
            f"{res['device']} {res['precision']}, {res['wall_s']:.0f} s", ""]


def _validation_loss(res: dict) -> list[str]:
    """Both modes' losses, with the note that says how the parallel one was scored."""
    vl = res["val_loss"]
    return ["## Validation loss", "",
            *_table(["mode", "loss (nats/token)"], [["autoregressive", _f(vl.get("loss_ar"))],
                                                    ["parallel", _f(vl.get("loss_par"))]]), "",
            _parallel_note(res["settings"]), ""]


def _coco_metrics(res: dict) -> list[str]:
    """The COCO table, with the decoding settings needed to compare it with published numbers."""
    coco, st = res["metrics"], res["settings"]
    # Each mode beside its blind baseline, so the image's contribution reads off adjacent columns.
    cols = [c for m in MODES for c in (m, f"blind_{m}") if c in coco]
    cols += ["ngram"] if "ngram" in coco else []
    n_refs = st.get("references_per_image", 1)
    refs = "one reference caption" if n_refs == 1 else f"{n_refs:g} reference captions"
    return ["## COCO caption metrics", "",
            f"pycocoevalcap with its PTB tokenizer, {refs} per image (all of them scored, as "
            f"COCO does). Decoding: greedy; beam search (beam {st['beam_size']}, finished "
            f"captions ranked by log-prob / length^{st.get('length_penalty', 1.0):g}); parallel "
            f"(one all-[MASK] pass at length {st.get('parallel_len', '?')}, cut at the first "
            "EOS). Blind = the same decoder and decoding with the image features zeroed: the "
            "sighted - blind gap is what the image adds. ngram = the text-only baseline's one "
            "caption for every image.", "",
            *_table(["metric", *[c.replace("_", " ") for c in cols]],
                    [[m.replace("_", "-"), *[_f(coco[c].get(m)) for c in cols]]
                     for m in METRICS]), ""]


def _attribute_accuracy(att: dict | None) -> list[str]:
    """Synthetic data only (real data has no attribute truth): the table, its floor and ceiling."""
    if not att:
        return []
    names = (*ATTRIBUTES, "all", "whole")
    return ["## Attribute accuracy (synthetic ground truth)", "",
            "Primary object's attributes parsed from each generated caption vs. the image's "
            "metadata. `chance` is the floor \"names it by chance\": always naming the "
            "attribute's most frequent value in this split (uniform guessing is lower: 1/9 "
            "colours, 1/6 shapes, 1/3 sizes, 1/9 positions, 1/3 counts). `ceiling` is the best a "
            "captioner that sees every object perfectly can expect: when the primary object is "
            "one of several single objects, nothing in the image says which one the captions "
            "name first. `whole`: the caption names all five attributes and each of its word "
            "pairs occurs in some training caption.", "",
            *_table(["mode", *ATTRIBUTES, "all five", "whole"],
                    [[k.replace("_", " "), *[_f(att[k].get(a)) for a in names]] for k in att]), ""]


def _zero_shot(zs: dict | None) -> list[str]:
    """Swapped-word ranking; absent on real data (nothing to swap) or with zero_shot_limit 0."""
    if not zs:
        return []
    return ["## Zero-shot scoring", "",
            "The reference caption with its primary object's word swapped for every colour "
            "(shape); the decoder's autoregressive log-likelihood picks one.", "",
            *_table(["attribute", "accuracy", "chance", "samples"],
                    [[k, _f(v["accuracy"]), _f(v["chance"]), str(v["samples"])]
                     for k, v in zs.items()]), ""]


def write_markdown(res: dict, path: Path, figures: dict[str, str]) -> None:
    """One page: provenance (a loud warning for a random-init encoder), metrics, attributes,
    blind, zero-shot."""
    L = [f"# Evaluation of `{res['run']}`", "", *_banners(res), *_provenance(res),
         *_validation_loss(res), *_baselines(res), *_coco_metrics(res),
         *_attribute_accuracy(res.get("attributes")), *_zero_shot(res.get("zero_shot")),
         "## Figures", ""]
    for title, fname in figures.items():
        L += [f"![{title}]({fname})", ""]
    atomic_write_text(path, "\n".join(L))
