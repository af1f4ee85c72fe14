"""Eval stage: caption the validation split (greedy, beam, parallel; blind), score it, write
eval.json + report.

`run` reads top to bottom: open the run and its validation split, the validation loss, captioning,
scoring, writing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from pipeline import checkpoint, metrics, report
from pipeline.captions import VOCAB, meta_attributes, meta_references
from pipeline.config import EvalConfig, FetchConfig, TrainConfig
from pipeline.devices import autocast, resolve_device, run_precision
from pipeline.errors import UserError
from pipeline import token_cache
from pipeline.loader import CaptionTokens, FeatureSource, Loader, split_positions
from pipeline.ngram import fit_baseline, warning as ngram_warning
from pipeline.osutil import printable
from pipeline.progress import console, make_progress
from pipeline.runlog import MetricsLog, plot_loss
from pipeline.store import FeatureStore, StoreIndex
from pipeline.trained_run import LoadedRun, load_run, open_run_store, trained_precision
from pipeline.training import validate


# --- the stage ------------------------------------------------------------------------------------
def run(cfg: EvalConfig) -> dict:
    """Evaluate a run's chosen checkpoint on its validation split; writes <run>/eval/{eval.json,
    report.md, *.png}."""
    t0 = time.perf_counter()
    data = open_split(cfg)
    timing: dict[str, float] = {}
    val_loss = validation_loss(data, cfg, timing)
    caps, zero_shot_result = caption(data, cfg, timing)
    scores = score(data, caps, timing)
    result = write(data, cfg, val_loss, caps, zero_shot_result, scores, timing, t0)
    _print_summary(result, data.run.path / "eval" / "report.md")
    return result


@dataclass
class EvalSplit:
    """What every step reads: the run, its validation split, and the first `k` validation samples
    (row order), which are captioned."""

    run: LoadedRun
    device: torch.device
    precision: str
    store: FeatureStore
    index: StoreIndex
    val_fraction: float
    train_pos: np.ndarray  # int64 [n_train]: positions into `index`
    val_pos: np.ndarray  # int64 [n_val]
    source: FeatureSource  # the validation split's features, in val_pos order
    max_new: int  # new tokens per caption
    k: int
    keys: list[str]  # [k]
    references: list[list[str]]  # [k] each one's reference captions (the training caption first)
    attrs: list[dict | None]  # [k] synthetic ground truth, None for real data

    @property
    def val_captions(self) -> list[str]:
        return [self.index.captions[i] for i in self.val_pos]


def open_split(cfg: EvalConfig) -> EvalSplit:
    """Load the run's decoder, open its store and cut its validation split."""
    device = resolve_device(cfg.device)  # this stage's one device: the decoder's and every batch's
    loaded = load_run(cfg.run, device, cfg.checkpoint)  # --checkpoint: best | last | PATH
    rec = loaded.record
    precision = run_precision(cfg.precision, device, trained_precision(loaded.path, rec))
    store = open_run_store(rec, cfg.store)
    index = store.index()
    from_recipe = rec.get("train", {}).get("val_fraction")  # a record without a `split`
    val_fraction = rec.get("split", {}).get("val_fraction", from_recipe)
    if val_fraction is None:
        raise UserError("the run's config.json records no validation split")
    train_pos, val_pos = split_positions(index.keys, float(val_fraction))
    if len(val_pos) == 0:
        raise UserError(f"the validation split of {store.path} is empty (val_fraction "
                        f"{val_fraction}, {len(index)} samples): nothing to evaluate")
    if store.is_random_init:
        console.print(f"[bold red]warning:[/] [red]{store.path} was encoded with a RANDOM-INIT "
                      "encoder: these captions and metrics carry no visual knowledge[/]",
                      highlight=False)
    source = FeatureSource(store, index.rows[val_pos], device=device, placement="auto",
                           slab_rows=store.shard_capacity)
    k = len(val_pos) if cfg.limit is None else min(cfg.limit, len(val_pos))
    first = val_pos[:k]
    meta = index.meta_of(first)  # only the captioned rows' metadata is read
    return EvalSplit(
        run=loaded, device=device, precision=precision, store=store, index=index,
        val_fraction=float(val_fraction), train_pos=train_pos, val_pos=val_pos, source=source,
        max_new=min(cfg.max_new_tokens, loaded.decoder.cfg.max_len), k=k,
        keys=[index.keys[i] for i in first],
        references=[meta_references(m, index.captions[i]) for m, i in zip(meta, first)],
        attrs=[meta_attributes(m) for m in meta])


# --- 1. validation loss ---------------------------------------------------------------------------
def validation_loss(data: EvalSplit, cfg: EvalConfig, timing: dict) -> dict:
    """The validation loss of both modes on the whole validation split."""
    t = time.perf_counter()
    dec, tok = data.run.decoder, data.run.tokenizer
    # The store's token cache when train left one for this tokenizer and store; else only the
    # validation captions are tokenised (building the whole cache here would cost more).
    cached = token_cache.lookup(data.index, tok, dec.cfg.max_len)
    tokens = CaptionTokens.of(cached.ids, cached.lengths).take(data.val_pos) if cached else \
        CaptionTokens(tok, data.val_captions, dec.cfg.max_len)
    # length buckets: less padding; the token-weighted loss does not depend on the order
    loader = Loader(data.source, tokens, np.arange(len(data.val_pos)), cfg.batch_size,
                    shuffle=False, prefetch=1, length_buckets=TrainConfig.length_buckets)
    val_loss = validate(dec, loader, data.precision)
    timing["val_loss_s"] = time.perf_counter() - t
    return val_loss


# --- 2. captioning --------------------------------------------------------------------------------
def caption(data: EvalSplit, cfg: EvalConfig,
            timing: dict) -> tuple[dict[str, list[str]], dict | None]:
    """Captions of the first k validation samples in every mode, and of no image at all
    (blind_<mode>); the zero-shot ranking on synthetic data. -> ({mode: [k] captions}, zero-shot
    result or None)."""
    dec, tok, k = data.run.decoder, data.run.tokenizer, data.k
    feats = data.source.read_positions(np.arange(k)).cpu()  # [K, P, E] fp16
    blind = torch.zeros(1, data.store.tokens, data.store.width, dtype=torch.float16)  # [1, P, E]
    caps: dict[str, list[str]] = {}
    synthetic_data = any(a is not None for a in data.attrs)
    zs_n = min(cfg.zero_shot_limit, k) if synthetic_data else 0
    zs = None
    with make_progress() as progress:
        for mode in report.MODES:
            task = progress.add_task(f"caption {mode}", total=k, unit="img")
            t = time.perf_counter()
            caps[mode] = caption_all(dec, tok, feats, mode, cfg, data.max_new, data.precision,
                                     progress, task)
            # The blind decoder sees the same (zero) input for every image: one caption serves them
            # all.
            caps[f"blind_{mode}"] = caption_all(dec, tok, blind, mode, cfg, data.max_new,
                                                data.precision) * k
            timing[f"{mode}_s"] = time.perf_counter() - t
        if zs_n:
            task = progress.add_task("zero-shot", total=2 * zs_n, unit="img")
            t = time.perf_counter()
            refs = [data.index.captions[i] for i in data.val_pos[:zs_n]]
            zs = zero_shot(dec, tok, feats[:zs_n], refs, dec.cfg.max_len, data.precision, progress,
                           task)
            timing["zero_shot_s"] = time.perf_counter() - t
    return caps, zs


def caption_all(decoder, tok, feats: torch.Tensor, mode: str, cfg: EvalConfig, max_new: int,
                precision: str, progress=None, task=None) -> list[str]:
    """Captions of fp16 features [K, P, E] (host) in batches; mode greedy | beam | parallel."""
    dev = next(decoder.parameters()).device
    out: list[str] = []
    for i in range(0, len(feats), cfg.batch_size):
        f = feats[i:i + cfg.batch_size].to(dev).float()  # [b, P, E]
        with torch.no_grad(), autocast(dev, precision):
            if mode == "parallel":
                ids = decoder.parallel_decode(f)  # one all-[MASK] pass at the run's parallel_len
            else:
                beam = cfg.beam_size if mode == "beam" else 1
                ids = decoder.generate(f, max_new_tokens=max_new, beam_size=beam,
                                       length_penalty=cfg.length_penalty)
        out += tok.decode_batch(ids.cpu())
        if progress is not None:
            progress.update(task, advance=len(f))
    return out


def zero_shot(decoder, tok, feats: torch.Tensor, refs: list[str], max_len: int, precision: str,
              progress=None, task=None, group: int = 8) -> dict:
    """Rank each reference with its primary colour (shape) swapped by the decoder's AR likelihood.

    -> {"colour": {accuracy, chance, samples}, "shape": {...}}; big_vision's CapPa scoring
    classifier does the same with class names in prompts.
    """
    dev = next(decoder.parameters()).device
    res = {}
    for key in ("colour", "shape"):
        cands = [metrics.attribute_candidates(r, key) for r in refs]
        ok = [i for i, c in enumerate(cands) if c is not None]
        hits = 0
        c = len(VOCAB[key])
        for j in range(0, len(ok), group):
            idx = ok[j:j + group]
            texts = [t for i in idx for t in cands[i][0]]  # [b*C]
            targets, mask = tok.encode_batch(texts, max_len)
            with torch.no_grad(), autocast(dev, precision):
                f = feats[idx].to(dev).float()  # [b, P, E]
                s = decoder.score(f, targets.to(dev), mask.to(dev))  # [b*C]
            picked = s.view(len(idx), c).argmax(1).tolist()
            hits += sum(p == cands[i][1] for p, i in zip(picked, idx))
            if progress is not None:
                progress.update(task, advance=len(idx))
        res[key] = {"accuracy": hits / len(ok) if ok else None, "chance": 1.0 / c,
                    "samples": len(ok)}
    return res


# --- 3. scoring -----------------------------------------------------------------------------------
@dataclass
class Scores:
    coco: dict[str, dict[str, float]]  # caption set -> COCO metric -> score
    attributes: dict | None  # caption set -> attribute accuracy; None for real data
    ngram: dict  # the text-only n-gram baseline (its one caption, its validation loss)


def score(data: EvalSplit, caps: dict[str, list[str]], timing: dict) -> Scores:
    """COCO metrics of every caption set (adding the n-gram baseline's set to `caps`) against every
    reference; attribute accuracy, its chance floor and its ceiling on synthetic data."""
    t = time.perf_counter()
    train_captions = [data.index.captions[i] for i in data.train_pos]
    # Text-only baseline: an n-gram LM of the training captions; its caption is the same for every
    # image.
    tok, max_len = data.run.tokenizer, data.run.decoder.cfg.max_len
    ngram = fit_baseline(tok, tok.encode_ids(train_captions, max_len),
                         tok.encode_ids(data.val_captions, max_len), max_len)
    caps["ngram"] = [ngram["caption"]] * data.k
    ref_map = dict(zip(data.keys, data.references))
    coco = metrics.coco_metrics_many(ref_map, {m: dict(zip(data.keys, c)) for m, c in caps.items()})
    timing["coco_metrics_s"] = time.perf_counter() - t
    truth = {key: a for key, a in zip(data.keys, data.attrs) if a is not None}
    if not truth:
        return Scores(coco, None, ngram)
    seen = metrics.caption_bigrams(train_captions)
    sets = (*report.MODES, *(f"blind_{m}" for m in report.MODES), "ngram")
    attributes = {m: {**metrics.attribute_accuracy(dict(zip(data.keys, caps[m])), truth),
                      "whole": metrics.whole_share(caps[m], seen)} for m in sets}
    attributes["chance"] = metrics.chance_accuracy(truth.values())
    attributes["ceiling"] = metrics.ceiling_accuracy(truth.values())
    return Scores(coco, attributes, ngram)


# --- 4. writing -----------------------------------------------------------------------------------
def write(data: EvalSplit, cfg: EvalConfig, val_loss: dict, caps: dict[str, list[str]],
          zs: dict | None, scores: Scores, timing: dict, t0: float) -> dict:
    """eval.json, report.md and the figures in <run>/eval; -> what eval.json holds."""
    out_dir = data.run.path / "eval"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    result = _result(data, cfg, val_loss, caps, zs, scores, timing)
    figures = write_figures(result, data, out_dir, cfg)
    result["figures"] = figures
    result["wall_s"] = time.perf_counter() - t0
    try:
        text = json.dumps(result, indent=2, sort_keys=True)
        checkpoint.atomic_write_text(out_dir / "eval.json", text)
        report.write_markdown(result, out_dir / "report.md", figures)
    except OSError as e:
        raise UserError(f"cannot write the report in {out_dir}: {e.strerror or e}") from None
    return result


def _result(data: EvalSplit, cfg: EvalConfig, val_loss: dict, caps: dict[str, list[str]],
            zs: dict | None, scores: Scores, timing: dict) -> dict:
    loaded, dec, store, k = data.run, data.run.decoder, data.store, data.k
    captions = [data.index.captions[i] for i in data.val_pos[:k]]
    samples = [{"key": key, "reference": r, "references": data.references[i],
                **{m: caps[m][i] for m in report.MODES}}
               for i, (key, r) in enumerate(zip(data.keys, captions))]
    warnings = [w for w in [ngram_warning(val_loss.get("loss_ar"), scores.ngram)] if w]
    return {
        "run": str(loaded.path),
        "checkpoint": {"dir": str(loaded.ckpt), "step": loaded.step, "chosen": loaded.chosen},
        "baselines": {"ngram": scores.ngram}, "warnings": warnings,
        "store": str(store.path), "encoder": store.encoder,
        "encoder_random_init": bool(store.is_random_init),
        "tokenizer": loaded.record["tokenizer"],
        "decoder_summary": f"{dec.cfg.layers} layers x {dec.cfg.width} wide, "
                           f"{dec.num_parameters() / 1e6:.1f} M params",
        "device": str(data.device), "precision": data.precision,
        "split": {"val_fraction": data.val_fraction, "val": int(len(data.val_pos)), "captioned": k},
        "settings": {"beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty,
                     "max_new_tokens": data.max_new, "parallel_len": dec.parallel_len,
                     "parallel_len_recorded": dec.cfg.parallel_len is not None,
                     "references_per_image": sum(map(len, data.references)) / max(k, 1),
                     "limit": cfg.limit, "zero_shot_limit": cfg.zero_shot_limit},
        "val_loss": val_loss, "metrics": scores.coco, "attributes": scores.attributes,
        "zero_shot": zs,
        "blind_captions": {m: caps[f"blind_{m}"][0] for m in report.MODES} if k else {},
        "samples": samples, "timing": timing,
    }


def write_figures(result: dict, data: EvalSplit, out_dir: Path, cfg: EvalConfig) -> dict:
    """loss.png, metrics.png, samples.png in out_dir -> {title: file name}."""
    plot_loss(MetricsLog(data.run.path / "metrics.jsonl").read(), out_dir / "loss.png",
              final=result["val_loss"],
              title="loss by mode (stars: this evaluation's validation loss)")
    report.plot_metric_bars(result["metrics"], out_dir / "metrics.png")
    n = min(cfg.grid, len(result["samples"]))
    store = data.store
    rows = [int(data.index.rows[i]) for i in data.val_pos[:n]]
    shards_dir = Path(cfg.shards or store.attrs.get("shards_dir") or FetchConfig.shards)
    keys = [s["key"] for s in result["samples"][:n]]
    shown = data.val_pos[:n]
    samples = [{"caption": data.index.captions[i], "url": _url(m)}
               for m, i in zip(data.index.meta_of(shown), shown)]
    images, sources = report.load_images(keys, rows, store.shards, store.shard_capacity, shards_dir,
                                         data.attrs[:n], samples)
    result["grid_images"] = {"shards_dir": str(shards_dir),
                             **{k: sources.count(k) for k in ("shard", "redrawn", "other", "missing")}}
    if result["grid_images"]["other"]:
        console.print(f"[yellow]warning:[/] {result['grid_images']['other']} grid image(s) in "
                      f"{escape(printable(str(shards_dir)))} are other samples than the store encoded under those "
                      "keys (another fetch?): not drawn from there", highlight=False)
    report.plot_grid(result["samples"][:n], images, out_dir / "samples.png")
    return {"loss curves": "loss.png", "COCO metrics": "metrics.png",
            "validation samples": "samples.png"}


def _url(meta: str) -> str | None:
    """The url a sample's stored metadata records (None where it records none)."""
    try:
        url = json.loads(meta).get("url") if meta else None
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None


def _print_summary(res: dict, report_path: Path) -> None:
    out = Console()
    m = res["metrics"]
    line = "  ".join(f"{mode} CIDEr {m[mode]['CIDEr']:.3f} "
                     f"(blind {m['blind_' + mode]['CIDEr']:.3f})" for mode in report.MODES)
    out.print(f"eval: {res['split']['captioned']} validation samples; {line}", highlight=False)
    if res.get("attributes"):
        att = res["attributes"]
        a, top = att["greedy"], att["ceiling"]
        accuracy = ", ".join(f"{k} {a[k]:.2f} ({top[k]:.2f})" for k in metrics.ATTRIBUTES)
        out.print(f"eval: greedy attribute accuracy (ceiling) {accuracy}", highlight=False)
        whole = ", ".join(f"{m} {att[m]['whole']:.2f}" for m in report.MODES)
        out.print(f"eval: whole captions {whole}", highlight=False)
    if res["encoder_random_init"]:
        out.print("[bold red]eval: RANDOM-INIT encoder: these numbers carry no visual knowledge[/]")
    for w in res.get("warnings", []):
        out.print(f"[bold red]warning:[/] [red]{escape(w)}[/]", highlight=False)
    # one copyable line
    out.print(f"[bold]report:[/] {report_path}", highlight=False, soft_wrap=True)
