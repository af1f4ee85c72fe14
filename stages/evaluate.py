"""Eval stage: caption the validation split (greedy, beam, parallel; blind), score it, write eval.json + report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import checkpoint, metrics, report, synthetic
from pipeline.config import EvalConfig, FetchConfig, TrainConfig
from pipeline.devices import autocast
from pipeline.errors import UserError
from pipeline.progress import console
from pipeline.run import load_run, open_run_store, trained_precision
from pipeline.runlog import MetricsLog, plot_loss
from pipeline.training import validate
from rich.markup import escape


# --- the validation samples' ground truth ------------------------------------------------------------------
# --- generation ------------------------------------------------------------------------------------------------
def caption_all(decoder, tok, feats: torch.Tensor, mode: str, cfg: EvalConfig, max_new: int, precision: str,
                progress=None, task=None) -> list[str]:
    """Captions of fp16 features [K, P, E] (host) in batches; mode greedy | beam | parallel."""
    dev = next(decoder.parameters()).device
    out: list[str] = []
    for i in range(0, len(feats), cfg.batch_size):
        f = feats[i:i + cfg.batch_size].to(dev).float()  # [b, P, E]
        with torch.no_grad(), autocast(dev, precision):
            if mode == "parallel":
                ids = decoder.parallel_decode(f)  # one all-[MASK] pass at the run's parallel_len
            else:
                ids = decoder.generate(f, max_new_tokens=max_new, beam_size=cfg.beam_size if mode == "beam" else 1,
                                       length_penalty=cfg.length_penalty)
        out += tok.decode_batch(ids.cpu())
        if progress is not None:
            progress.update(task, advance=len(f))
    return out


def zero_shot(decoder, tok, feats: torch.Tensor, refs: list[str], max_len: int, precision: str, progress=None, task=None,
              group: int = 8) -> dict:
    """Rank each reference with its primary colour (shape) swapped by the decoder's AR likelihood.

    -> {"colour": {accuracy, chance, samples}, "shape": {...}}; big_vision's CapPa scoring classifier does the same
    with class names in prompts.
    """

    dev = next(decoder.parameters()).device
    res = {}
    for key in ("colour", "shape"):
        cands = [metrics.attribute_candidates(r, key) for r in refs]
        ok = [i for i, c in enumerate(cands) if c is not None]
        hits = 0
        c = len(synthetic.VOCAB[key])
        for j in range(0, len(ok), group):
            idx = ok[j:j + group]
            texts = [t for i in idx for t in cands[i][0]]  # [b*C]
            targets, mask = tok.encode_batch(texts, max_len)
            with torch.no_grad(), autocast(dev, precision):
                s = decoder.score(feats[idx].to(dev).float(), targets.to(dev), mask.to(dev))  # [b*C]
            picked = s.view(len(idx), c).argmax(1).tolist()
            hits += sum(p == cands[i][1] for p, i in zip(picked, idx))
            if progress is not None:
                progress.update(task, advance=len(idx))
        res[key] = {"accuracy": hits / len(ok) if ok else None, "chance": 1.0 / c, "samples": len(ok)}
    return res


# --- the stage -------------------------------------------------------------------------------------------------
def run(cfg: EvalConfig) -> dict:
    """Evaluate a run's last checkpoint on its validation split; writes <run>/eval/{eval.json, report.md, *.png}."""
    from pipeline.devices import resolve_device, run_precision
    from pipeline.loader import CaptionTokens, FeatureSource, Loader, split_positions
    from pipeline.ngram import fit_baseline, warning as ngram_warning
    from pipeline.progress import make_progress

    t0 = time.perf_counter()
    if cfg.beam_size < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise UserError("--beam-size, --batch-size and --max-new-tokens must be >= 1")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be >= 1 (got {cfg.limit})")
    device = resolve_device(cfg.device)  # the one device of this stage: the decoder's and every batch's
    loaded = load_run(cfg.run, device)
    rec, dec, tok = loaded.record, loaded.decoder, loaded.tokenizer
    precision = run_precision(cfg.precision, device, trained_precision(loaded.path, rec))
    store = open_run_store(rec, cfg.store)
    index = store.index()
    val_fraction = rec.get("split", {}).get("val_fraction", rec.get("train", {}).get("val_fraction"))
    if val_fraction is None:
        raise UserError("the run's config.json records no validation split")
    train_pos, val_pos = split_positions(index.keys, float(val_fraction))
    if len(val_pos) == 0:
        raise UserError(f"the validation split of {store.path} is empty (val_fraction {val_fraction}, "
                        f"{len(index)} samples): nothing to evaluate")
    max_len = dec.cfg.max_len
    max_new = min(cfg.max_new_tokens, max_len)
    if store.is_random_init:
        console.print(f"[bold red]warning:[/] [red]{store.path} was encoded with a RANDOM-INIT encoder: these "
                      "captions and metrics carry no visual knowledge[/]", highlight=False)

    # -- validation loss of both modes, on the whole validation split -----------------------------------------
    t = time.perf_counter()
    vcap = [index.captions[i] for i in val_pos]
    source = FeatureSource(store, index.rows[val_pos], device=device, placement="auto",
                           slab_rows=store.shard_capacity)
    tokens = CaptionTokens(tok, vcap, max_len)
    loader = Loader(source, tokens, np.arange(len(val_pos)), cfg.batch_size, shuffle=False, prefetch=1,
                    length_buckets=TrainConfig.length_buckets)  # less padding; the token-weighted loss is order-free
    val_loss = validate(dec, loader, precision)
    timing = {"val_loss_s": time.perf_counter() - t}

    # -- captions: the first `limit` validation samples in row order --------------------------------------------
    k = len(val_pos) if cfg.limit is None else min(cfg.limit, len(val_pos))
    feats = source.read_positions(np.arange(k)).cpu()  # [K, P, E] fp16
    keys, refs = [index.keys[i] for i in val_pos[:k]], vcap[:k]
    attrs = [synthetic.meta_attributes(index.meta[i]) for i in val_pos[:k]]
    references = [synthetic.meta_references(index.meta[i], r) for i, r in zip(val_pos[:k], refs)]
    synthetic_data = any(a is not None for a in attrs)
    blind = torch.zeros(1, store.tokens, store.width, dtype=torch.float16)  # [1, P, E]: no image at all
    caps: dict[str, list[str]] = {}
    zs_n = min(cfg.zero_shot_limit, k) if synthetic_data else 0
    with make_progress() as progress:
        for mode in report.MODES:
            task = progress.add_task(f"caption {mode}", total=k, unit="img")
            t = time.perf_counter()
            caps[mode] = caption_all(dec, tok, feats, mode, cfg, max_new, precision, progress, task)
            # The blind decoder sees the same (zero) input for every image, so one caption serves them all.
            caps[f"blind_{mode}"] = caption_all(dec, tok, blind, mode, cfg, max_new, precision) * k
            timing[f"{mode}_s"] = time.perf_counter() - t
        zs = None
        if zs_n:
            task = progress.add_task("zero-shot", total=2 * zs_n, unit="img")
            t = time.perf_counter()
            zs = zero_shot(dec, tok, feats[:zs_n], refs[:zs_n], max_len, precision, progress, task)
            timing["zero_shot_s"] = time.perf_counter() - t

    # -- scores ---------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    ref_map = dict(zip(keys, references))  # every reference of each image, as COCO scores
    # Text-only baseline: an n-gram LM of the training captions; its caption is the same for every image.
    ngram = fit_baseline(tok, [index.captions[i] for i in train_pos], vcap, max_len)
    caps["ngram"] = [ngram["caption"]] * k
    coco = metrics.coco_metrics_many(ref_map, {m: dict(zip(keys, c)) for m, c in caps.items()})
    timing["coco_metrics_s"] = time.perf_counter() - t
    attributes = None
    if synthetic_data:
        truth = {key: a for key, a in zip(keys, attrs) if a is not None}
        seen = metrics.caption_bigrams(index.captions[i] for i in train_pos)
        attributes = {m: {**metrics.attribute_accuracy(dict(zip(keys, caps[m])), truth),
                          "whole": metrics.whole_share(caps[m], seen)}
                      for m in (*report.MODES, *(f"blind_{m}" for m in report.MODES), "ngram")}
        attributes["chance"] = metrics.chance_accuracy(truth.values())
        attributes["ceiling"] = metrics.ceiling_accuracy(truth.values())

    # -- outputs --------------------------------------------------------------------------------------------------
    out_dir = loaded.path / "eval"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    samples = [{"key": key, "reference": r, "references": references[i], **{m: caps[m][i] for m in report.MODES}}
               for i, (key, r) in enumerate(zip(keys, refs))]
    result = {
        "run": str(loaded.path), "checkpoint": {"dir": str(loaded.ckpt), "step": loaded.step, "chosen": loaded.chosen},
        "baselines": {"ngram": ngram}, "warnings": [w for w in [ngram_warning(val_loss.get("loss_ar"), ngram)] if w],
        "store": str(store.path), "encoder": store.encoder, "encoder_random_init": bool(store.is_random_init),
        "tokenizer": rec["tokenizer"],
        "decoder_summary": f"{dec.cfg.layers} layers x {dec.cfg.width} wide, {dec.num_parameters() / 1e6:.1f} M params",
        "device": str(device), "precision": precision,
        "split": {"val_fraction": float(val_fraction), "val": int(len(val_pos)), "captioned": k},
        "settings": {"beam_size": cfg.beam_size, "length_penalty": cfg.length_penalty, "max_new_tokens": max_new,
                     "parallel_len": dec.parallel_len, "parallel_len_recorded": dec.cfg.parallel_len is not None,
                     "references_per_image": sum(map(len, references)) / max(k, 1),
                     "limit": cfg.limit, "zero_shot_limit": cfg.zero_shot_limit},
        "val_loss": val_loss, "metrics": coco, "attributes": attributes, "zero_shot": zs,
        "blind_captions": {m: caps[f"blind_{m}"][0] for m in report.MODES} if k else {},
        "samples": samples, "timing": timing,
    }
    figures = write_figures(result, loaded.path, out_dir, store, index, val_pos[:k], attrs, cfg)
    result["figures"] = figures
    result["wall_s"] = time.perf_counter() - t0
    try:
        checkpoint.atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2, sort_keys=True))
        report.write_markdown(result, out_dir / "report.md", figures)
    except OSError as e:
        raise UserError(f"cannot write the report in {out_dir}: {e.strerror or e}") from None
    _print_summary(result, out_dir / "report.md")
    return result


def write_figures(result: dict, run: Path, out_dir: Path, store, index, rows_pos, attrs, cfg: EvalConfig) -> dict:
    """loss.png, metrics.png, samples.png in out_dir -> {title: file name}."""
    plot_loss(MetricsLog(run / "metrics.jsonl").read(), out_dir / "loss.png", final=result["val_loss"],
              title="loss by mode (stars: this evaluation's validation loss)")
    report.plot_metric_bars(result["metrics"], out_dir / "metrics.png")
    n = min(cfg.grid, len(result["samples"]))
    rows = [int(index.rows[i]) for i in rows_pos[:n]]
    shards_dir = Path(cfg.shards or store.attrs.get("shards_dir") or FetchConfig.shards)
    images, sources = report.load_images([s["key"] for s in result["samples"][:n]], rows, store.shards,
                                         store.shard_capacity, shards_dir, attrs[:n])
    result["grid_images"] = {"shards_dir": str(shards_dir), **{k: sources.count(k) for k in ("shard", "redrawn", "missing")}}
    report.plot_grid(result["samples"][:n], images, out_dir / "samples.png")
    return {"loss curves": "loss.png", "COCO metrics": "metrics.png", "validation samples": "samples.png"}


def _print_summary(res: dict, report_path: Path) -> None:
    from rich.console import Console

    out = Console()
    m = res["metrics"]
    line = "  ".join(f"{mode} CIDEr {m[mode]['CIDEr']:.3f} (blind {m['blind_' + mode]['CIDEr']:.3f})"
                     for mode in report.MODES)
    out.print(f"eval: {res['split']['captioned']} validation samples; {line}", highlight=False)
    if res.get("attributes"):
        att = res["attributes"]
        a, top = att["greedy"], att["ceiling"]
        out.print("eval: greedy attribute accuracy (ceiling) " +
                  ", ".join(f"{k} {a[k]:.2f} ({top[k]:.2f})" for k in metrics.ATTRIBUTES), highlight=False)
        out.print("eval: whole captions " + ", ".join(f"{m} {att[m]['whole']:.2f}" for m in report.MODES),
                  highlight=False)
    if res["encoder_random_init"]:
        out.print("[bold red]eval: RANDOM-INIT encoder: these numbers carry no visual knowledge[/]")
    for w in res.get("warnings", []):
        out.print(f"[bold red]warning:[/] [red]{escape(w)}[/]", highlight=False)
    out.print(f"[bold]report:[/] {report_path}", highlight=False, soft_wrap=True)  # one copyable line
