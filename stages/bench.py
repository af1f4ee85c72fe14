"""`pipeline bench`: every stage measured against the machine's matmul limit and a seed-style baseline.

One process. A ratio's two sides are measured interleaved (A B A B ..., after a warm-up round), so a slow
phase of a noisy machine hits both; each figure is the median over the rounds with its spread (min-max), and
a target counts as met only when it holds at the unfavourable end of the spread. Results are kept per
machine kind (`cpu-avx2`, `cpu-avx512bf16`, `cuda-<gpu name>`) in a JSON file; a full run regenerates the
table inside docs/BENCHMARKS.md (between markers; the hand-written analysis around it is kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

from pipeline.benchmark import (fmt, git_commit, interleaved, machine_name, met_at_least, outputs_plan, ratios, spread,
                                timed, write_outputs)
from pipeline.config import BenchConfig, DecoderConfig, EncodeConfig, TrainConfig, decoder_config
from pipeline.errors import UserError
from pipeline.progress import console

VIT_B16_GFLOP = 35.2  # forward, one 224x224 image (timm's count for vit_base_patch16_224): the fallback count


# --- 1. the limit --------------------------------------------------------------------------------------------
def matmul_size(device, dtype, *, budget_s: float, sync) -> int:
    """The square matmul size whose product takes long enough to time well (capped at 8192).

    The growth stops early on slow paths (bf16 on a CPU without native bf16 runs at ~1 GFLOP/s), so the
    measurement never takes minutes.
    """
    import torch

    n = 256
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        t = timed(lambda: a @ a, repeats=3, sync=sync)
        if t * 8 > budget_s or n >= 8192:
            return n
        n *= 2


def matmul_fn(device, dtype, n: int) -> tuple[Callable[[], object], float]:
    """(one n x n matmul, its FLOPs)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2.0 * n ** 3


def matmul_rate(device, dtype, *, budget_s: float, sync, repeats: int = 3) -> dict:
    """GFLOP/s of square matmuls: {n, gflops (median), spread}."""
    n = matmul_size(device, dtype, budget_s=budget_s, sync=sync)
    fn, flop = matmul_fn(device, dtype, n)
    s = spread([flop / t / 1e9 for t in interleaved({"mm": fn}, repeats=repeats, sync=sync)["mm"]])
    return {"n": n, "gflops": s["median"], "spread": s}


def bench_limit(device, quick: bool, sync, repeats: int) -> dict:
    import torch

    budget = 1.0 if quick else 3.0
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = matmul_rate(device, dtype, budget_s=budget, sync=sync, repeats=max(3, repeats))
        console.print(f"  matmul {name}: {fmt(out[name]['spread'], 1)} GFLOP/s (n={out[name]['n']})")
    return out


def _limit_side(device, precision: str, limit: dict, sync):
    """The matmul of the precision in use, as one side of an interleaved ratio: (fn, FLOPs)."""
    import torch

    name = "bf16" if precision == "bf16" else "fp32"
    return matmul_fn(device, torch.bfloat16 if name == "bf16" else torch.float32, limit[name]["n"])


# --- 2. encode -------------------------------------------------------------------------------------------------
def encoder_gflop(enc) -> float:
    """Forward GFLOP of one image through the encoder, counted by PyTorch (timm's 35.2 for ViT-B/16)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = enc.provenance["preprocessing"]["input_size"]
    try:
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            enc.model.forward_features(torch.zeros(1, c, h, w, device=enc.device))
        return fc.get_total_flops() / 1e9
    except Exception:  # noqa: BLE001 - a model the counter cannot trace: the ViT-B/16 figure
        return VIT_B16_GFLOP


def _pipeline(*args) -> None:
    """Run `pipeline <args>` as a user would, in its own process (quietly; its error line if it fails)."""
    done = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"bench: `pipeline {' '.join(map(str, args))}` failed: {done.stderr.strip().splitlines()[-1:]}")


class _EncodeStage:
    """One `pipeline encode` of the bench's shards per call; `img_per_s` = images / the stage's own loop time
    (encoder build and start-up excluded), read from the store's record of the run."""

    def __init__(self, args: list, store: Path):
        self.args, self.store, self.img_per_s = args, store, []

    def __call__(self) -> None:
        _pipeline("encode", *self.args)
        record = json.loads((self.store / "zarr.json").read_text())["attributes"]["last_run"]
        self.img_per_s.append(record["img_per_s"])


def bench_encode(device, precision: str, quick: bool, sync, workdir: Path, limit: dict, repeats: int,
                 model: str = EncodeConfig.model, workers: int = EncodeConfig.workers) -> dict:
    """The encoder's model-only img/s interleaved with the matmul limit, then with the whole stage
    (shards -> store, rewritten each round) on freshly fetched synthetic shards."""
    import torch

    from pipeline.encoder import build_random

    enc = build_random(model, 0, device, precision)
    gflop = encoder_gflop(enc)
    bs = 8 if quick else EncodeConfig.batch_size
    c, h, w = enc.provenance["preprocessing"]["input_size"]
    x = torch.randn(bs, c, h, w, device=device)  # on the device: the model alone
    mm, mm_flop = _limit_side(device, precision, limit, sync)
    t = interleaved({"model": lambda: enc.forward(x), "limit": mm}, repeats=repeats, sync=sync)
    model_ips = [bs / s for s in t["model"]]
    vs_limit = ratios([r * gflop * 1e9 for r in model_ips], [mm_flop / s for s in t["limit"]])
    console.print(f"  encode model-only: {fmt(spread(model_ips))} img/s = {fmt(vs_limit, pct=True)} of the limit")

    n = 48 if quick else 128
    shards, store = workdir / "shards", workdir / "features.zarr"
    _pipeline("fetch", "--count", n, "--shards", shards, "--samples-per-shard", 32, "--broken-fraction", 0.0,
              "--processes", 1, "--threads", 8, "--synthetic-dir", workdir / "synthetic")
    stage = _EncodeStage(["--shards", shards, "--store", store, "--model", model, "--weights", "random",
                          "--batch-size", bs, "--device", device.type, "--precision", precision,
                          "--workers", workers, "--overwrite"], store)
    stage_ips = stage.img_per_s
    t = interleaved({"model": lambda: enc.forward(x), "stage": stage}, repeats=repeats, warmup=0, sync=sync)
    stage_vs_model = ratios(stage_ips, [bs / s for s in t["model"]])
    console.print(f"  encode stage: {fmt(spread(stage_ips))} img/s = {fmt(stage_vs_model, pct=True)} of model-only")
    return {"model": model, "tokens": enc.tokens, "width": enc.width, "batch_size": bs, "workers": workers,
            "gflop_per_image": gflop,
            "model_img_per_s": spread(model_ips), "model_vs_limit": vs_limit,
            "stage_img_per_s": spread(stage_ips), "stage_vs_model": stage_vs_model, "stage_images": n}


# --- 3. train ---------------------------------------------------------------------------------------------------
def _captions(n: int) -> list[str]:
    from pipeline.synthetic import make_row

    return [make_row(0, i)[1] for i in range(n)]


def train_decoder_config(image_width: int, parallel_len: int | None = None, image_tokens: int | None = None):
    """The trainer's default decoder (TrainConfig) on `image_tokens` features `image_width` wide."""
    return decoder_config(TrainConfig(parallel_len=parallel_len), image_tokens, image_width)


def train_flops_per_sample(dec, batches: list, image_tokens: int, parallel_fraction: float) -> dict:
    """Expected train FLOPs per sample over `batches` as the trainer runs them: each row AR (at its batch's
    padded length) or parallel (at Lp) with the given odds, each sub-pass in the cross-attention form the
    decoder picks for it ("auto"), and the same with every pass in the "kv" form."""
    from pipeline.cost import flops_per_sample, parallel_shared_flops

    cfg, p, frac, lp = dec.cfg, image_tokens, parallel_fraction, dec.parallel_len
    out = {"auto": 0.0, "kv": 0.0}
    for targets, mask in batches:
        real = float(mask.sum(1).float().mean())  # real tokens per row: what the vocab head runs on
        for key in out:
            ar_form = dec.cross_form(targets.shape[1], p) if key == "auto" else "kv"
            par_form = dec.cross_form(lp, p) if key == "auto" else "kv"
            ar = flops_per_sample(cfg, real, p, ar_form)["train"]
            par = flops_per_sample(cfg, min(real, lp), p, par_form, parallel=True)["train"]
            shared = parallel_shared_flops(cfg, par_form)["train"] / len(targets)  # once per batch
            out[key] += ((1 - frac) * ar + frac * par + (shared if frac > 0 else 0.0)) / len(batches)
    return out


def _length_sorted_batches(tok, bs: int, window: int, max_len: int, quick: bool, device):
    """The trainer's batches: one window of `window` batches sorted by caption extent, of which an
    evenly spaced sample (short to long) is timed, so the mix of padded lengths is a training run's.
    -> ([(targets [B, w], mask [B, w])], the pool's longest caption in tokens)."""
    import torch

    pool_t, pool_m = tok.encode_batch(_captions(bs * window), max_len)  # [B*window, L] each
    extent = (pool_m * torch.arange(1, pool_m.shape[1] + 1)).amax(1)
    srt = torch.argsort(extent, stable=True)
    picks = ((window // 4, 3 * window // 4) if quick
             else tuple(range(window // 8, window, window // 4)))
    batches = []
    for i in picks:
        idx = srt[i * bs:(i + 1) * bs]
        w = int(extent[idx].max())  # padded to the batch's own longest caption, as the loader does
        batches.append((pool_t[idx, :w].to(device), pool_m[idx, :w].to(device)))
    return batches, int(pool_m.sum(1).max())


def _trainer_step(state, batches: list, feats, frac: float, gen, device,
                  mixing: str) -> Callable[[], None]:
    """One pass of the trainer's `train_step` over `batches` (features `feats` [B, P, E]). `mixing`
    says whether the AR/parallel mode is drawn per example (CapPa's) or once per batch."""
    import torch

    from pipeline.loader import Batch
    from pipeline.training import train_step

    bs, lp = len(feats), state.decoder.parallel_len

    def run():
        for targets, mask in batches:
            if mixing == "per-example":
                par = torch.rand(bs, generator=gen) < frac
            else:
                par = torch.full((bs,), bool(torch.rand(1, generator=gen) < frac))
            train_step(state, Batch.of(feats, targets, mask, par.to(device), lp))
    return run


def _seed_step(venc, state, tok, train_cfg: TrainConfig, max_len: int, gen,
               device) -> Callable[[], None]:
    """The seed-style baseline step: the encoder runs inside every step (fp32), captions padded to
    max_len, logits for every position; the same decoder and optimizer as the trainer's steps."""
    import torch
    import torch.nn.functional as F

    dec = state.decoder
    bs, frac = train_cfg.batch_size, train_cfg.parallel_fraction
    images = torch.randn(bs, *venc.provenance["preprocessing"]["input_size"])  # [B, C, H, W]
    tfix, mfix = tok.encode_batch(_captions(bs), max_len)
    tfix = F.pad(tfix, (0, max_len - tfix.shape[1]), value=tok.eos_id).to(device)  # [B, max_len]
    mfix = F.pad(mfix, (0, max_len - mfix.shape[1])).to(device)

    def step():
        dec.cross_attention = "kv"  # the seed's decoder: image K/V projected in every layer
        f = torch.from_numpy(venc.forward(images)).to(device).float()  # the encoder, every step
        # one mode for the whole batch, as the seed mixed them
        par = torch.full((bs,), bool(torch.rand(1, generator=gen) < frac), device=device)
        logits = dec.logits(f, tfix, mfix, par)  # [B, L, V]
        loss = F.cross_entropy(logits[mfix], tfix[mfix])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), train_cfg.grad_clip)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        dec.cross_attention = train_cfg.cross_attention
    return step


def _train_result(dec, batches: list, image_tokens: int, frac: float, flops: dict, t: dict,
                  mm_flop: float, length_buckets: int) -> dict:
    """bench_train's figures from the round times `t`: samples/s of each step, the share of the
    matmul limit and the speedup over the seed-style step (both round by round)."""
    p, bs = image_tokens, len(batches[0][0])  # every timed batch is full: B rows
    n = bs * len(batches)  # samples per pass of a trainer step; the seed step takes one batch
    real = [float(m.sum(1).float().mean()) for _, m in batches]
    cfg = dec.cfg
    rate = {k: [(bs if k == "baseline" else n) / s for s in t[k]]
            for k in ("per-example", "per-batch", "baseline")}
    out = {"batch_size": bs, "batches_timed": len(batches), "length_buckets": length_buckets,
           "image_tokens": p,
           "decoder": {"layers": cfg.layers, "width": cfg.width, "heads": cfg.heads,
                       "mlp_dim": cfg.mlp_dim, "parallel_len": dec.parallel_len},
           "step": "pipeline.training.train_step", "parallel_fraction": frac,
           "mean_tokens": sum(real) / len(real),
           "padded_len": sum(t_.shape[1] for t_, _ in batches) / len(batches),
           "cross_attention": {"ar": [dec.cross_form(t_.shape[1], p) for t_, _ in batches],
                               "parallel": dec.cross_form(dec.parallel_len, p)},
           "train_gflop_per_sample": flops["auto"] / 1e9,
           "train_gflop_per_sample_kv_form": flops["kv"] / 1e9,
           **{f"samples_per_s_{k}": spread(v) for k, v in rate.items()}}
    out["vs_limit"] = ratios([r * flops["auto"] for r in rate["per-example"]],
                             [mm_flop / s for s in t["limit"]])
    out["speedup_vs_baseline"] = ratios(rate["per-example"], rate["baseline"])
    console.print(f"  train (per-example): {fmt(out['samples_per_s_per-example'])} samples/s = "
                  f"{fmt(out['vs_limit'], pct=True)} of the limit; "
                  f"{fmt(out['speedup_vs_baseline'], 1)}x the seed-style step")
    return out


def bench_train(device, precision: str, quick: bool, sync, limit: dict, repeats: int, *,
                dec_cfg=None, vit: str = EncodeConfig.model, batch_size: int | None = None) -> dict:
    """The trainer's own `train_step` (pipeline/training.py) on cached-feature-shaped inputs,
    batched as the trainer batches them (a window of `length_buckets` batches sorted by caption
    length), interleaved with the matmul limit, with per-batch mixing and with a seed-style step
    (the encoder every step, fp32, fixed padding to max_len, full logits). Sizes come from
    TrainConfig / DecoderConfig (or `dec_cfg`) and the ViT."""
    import torch

    from pipeline.dist import Dist
    from pipeline.encoder import build_random
    from pipeline.model import CaptionDecoder
    from pipeline.tokenizer import load_tokenizer
    from pipeline.training import TrainState

    # The baseline's encoder; its output shape [P, E] is the cached features'.
    venc = build_random(vit, 0, device, "fp32")
    p, e = venc.tokens, venc.width
    train_cfg = TrainConfig(batch_size=batch_size or (8 if quick else TrainConfig.batch_size),
                            precision=precision)
    bs, frac = train_cfg.batch_size, train_cfg.parallel_fraction
    max_len = (dec_cfg or TrainConfig).max_len
    tok = load_tokenizer(train_cfg.tokenizer)
    window = max(train_cfg.length_buckets, 4)
    batches, longest = _length_sorted_batches(tok, bs, window, max_len, quick, device)
    feats = torch.randn(bs, p, e, device=device)  # [B, P, E]
    # Seeded after the features and before the decoder: its initial weights are the same every run.
    torch.manual_seed(0)
    # Parallel rows at the trainer's Lp: the longest caption (of this pool).
    dec = CaptionDecoder(dec_cfg or train_decoder_config(e, longest, p)).to(device)
    state = TrainState.create(dec, train_cfg, 10**6, precision, Dist(), device)
    gen = torch.Generator().manual_seed(0)  # the steps' mode draws: one stream, in round order
    flops = train_flops_per_sample(dec, batches, p, frac)
    # Built in this order: the seed step's images come from the global RNG after the decoder's init.
    steps = {"per-example": _trainer_step(state, batches, feats, frac, gen, device, "per-example"),
             "per-batch": _trainer_step(state, batches, feats, frac, gen, device, "per-batch"),
             "baseline": _seed_step(venc, state, tok, train_cfg, max_len, gen, device)}
    mm, mm_flop = _limit_side(device, precision, limit, sync)
    t = interleaved({**steps, "limit": mm}, repeats=repeats, sync=sync)
    return _train_result(dec, batches, p, frac, flops, t, mm_flop, window)


# --- 4. loader --------------------------------------------------------------------------------------------------
def bench_loader(device, quick: bool, workdir: Path, repeats: int, *, image_tokens: int, image_width: int) -> dict:
    """Stream a store of `image_tokens` x `image_width` features through the training loader (page cache
    warm) at the trainer's batch size: GB/s and samples/s."""
    import numpy as np

    from pipeline.loader import CaptionTokens, FeatureSource, Loader
    from pipeline.store import FeatureStore
    from pipeline.tokenizer import load_tokenizer

    n_shards, cap = (2, 256) if quick else (6, 256)
    path = workdir / "loader.zarr"
    enc = {"model": "bench", "weights": {"kind": "random-init", "seed": 0}}
    p, e = image_tokens, image_width
    st = FeatureStore.create(path, encoder=enc, tokens=p, width=e, shard_capacity=cap,
                             shards=[f"{i:05d}" for i in range(n_shards)])
    rng = np.random.default_rng(0)
    caps = _captions(cap)
    for s in range(n_shards):
        feats = rng.standard_normal((cap, p, e), dtype=np.float32).astype(np.float16)
        st.write_shard(s, feats, [f"{s:05d}{i:04d}" for i in range(cap)], caps, [""] * cap)
    st = FeatureStore.open(path)
    index = st.index()
    tokens = CaptionTokens(load_tokenizer(TrainConfig.tokenizer), index.captions, TrainConfig.max_len)

    def one_epoch():
        src = FeatureSource(st, index.rows, device=device, placement="stream", slab_rows=cap)
        loader = Loader(src, tokens, np.arange(len(index)), TrainConfig.batch_size, seed=0)
        for b in loader.epoch(0):
            pass

    t = interleaved({"epoch": one_epoch}, repeats=repeats, warmup=1)["epoch"]  # warm-up: the page cache
    nbytes = len(index) * p * e * 2
    out = {"samples": len(index), "gb_per_s": spread([nbytes / x / 1e9 for x in t]),
           "samples_per_s": spread([len(index) / x for x in t])}
    console.print(f"  loader: {fmt(out['gb_per_s'])} GB/s, {out['samples_per_s']['median']:.0f} samples/s")
    return out


# --- 5. generation ----------------------------------------------------------------------------------------------
def bench_generate(device, precision: str, quick: bool, sync, repeats: int, *, image_tokens: int,
                   dec_cfg=None) -> dict:
    """Captions of 32 new tokens: greedy with and without the KV cache, beam 3 and CapPa parallel decoding,
    interleaved (default-recipe decoder)."""
    import torch

    from pipeline.devices import autocast
    from pipeline.model import CaptionDecoder

    torch.manual_seed(0)
    cfg = dec_cfg or train_decoder_config(DecoderConfig.encoder_width, image_tokens=image_tokens)
    dec = CaptionDecoder(cfg).to(device).eval()
    torch.nn.init.normal_(dec.head.weight, std=0.02)  # a zero head would make every step's argmax trivial
    eos = dec.cfg.eos_id
    with torch.no_grad():
        dec.head.weight[eos] = -10.0  # never stop early: every row decodes all its tokens
    bs, new = (4 if quick else 8), min(32, cfg.max_len)
    feats = torch.randn(bs, image_tokens, cfg.encoder_width, device=device)

    def timed_fn(fn):
        def run():
            with torch.no_grad(), autocast(device, precision):
                return fn(feats)
        return run

    fns = {"cache": lambda f: dec.generate(f, max_new_tokens=new),
           "no_cache": lambda f: dec.generate(f, max_new_tokens=new, use_cache=False),
           "beam3": lambda f: dec.generate(f, max_new_tokens=new, beam_size=3),
           "parallel": lambda f: dec.parallel_decode(f)}
    t = interleaved({k: timed_fn(fn) for k, fn in fns.items()}, repeats=repeats, sync=sync)
    out = {"batch_size": bs, "new_tokens": new, "parallel_call": "parallel_decode(f)"}
    for k in fns:
        out[f"{k}_img_per_s"] = spread([bs / x for x in t[k]])
    for k in ("cache", "no_cache", "beam3"):
        out[f"{k}_tokens_per_s"] = spread([bs * new / x for x in t[k]])
    out["kv_speedup"] = ratios([1 / x for x in t["cache"]], [1 / x for x in t["no_cache"]])
    console.print(f"  generate img/s: greedy {fmt(out['cache_img_per_s'], 1)}, beam 3 {fmt(out['beam3_img_per_s'], 1)}, "
                  f"parallel {fmt(out['parallel_img_per_s'], 1)}; KV cache {fmt(out['kv_speedup'], 1)}x")
    return out


# --- 6. end to end ----------------------------------------------------------------------------------------------
def end_to_end(shards: Path = Path("data/shards"), store: Path = Path("cache/features.zarr"),
               run: Path = Path("cache/runs/default")) -> dict:
    """Wall time of each stage of the last `make all`, read from the stages' own records."""
    out: dict = {}
    rec = shards / "_fetch" / "run.json"
    if rec.exists():
        out["fetch_s"] = json.loads(rec.read_text()).get("timings", {}).get("total_s")
    zattrs = store / "zarr.json"
    if zattrs.exists():
        last = json.loads(zattrs.read_text()).get("attributes", {}).get("last_run", {})
        out["encode_s"] = last.get("wall_s")
    summ = run / "summary.json"
    if summ.exists():
        out["train_s"] = json.loads(summ.read_text()).get("stage_wall_s")
    ev = run / "eval" / "eval.json"
    if ev.exists():
        out["eval_s"] = json.loads(ev.read_text()).get("wall_s")
    known = [v for v in out.values() if isinstance(v, (int, float))]
    if len(known) == 4:
        out["total_s"] = sum(known)
    return out


def figures_of(r: dict, precision: str) -> list[dict]:
    """The table's rows: value = median (min-max over interleaved rounds); met = holds across the spread."""
    lim, enc, tr, ld, gen, e2e = (r[k] for k in ("limit", "encode", "train", "loader", "generate", "end_to_end"))
    used = f"{'bf16' if precision == 'bf16' else 'fp32'} limit"
    figs = [
        {"figure": "matmul fp32", "value": f"{fmt(lim['fp32']['spread'], 1)} GFLOP/s"},
        {"figure": "matmul bf16", "value": f"{fmt(lim['bf16']['spread'], 1)} GFLOP/s"},
        {"figure": "encode model-only", "value": f"{fmt(enc['model_img_per_s'])} img/s = "
         f"{fmt(enc['model_vs_limit'], pct=True)} of {used}", "target": ">= 80% of limit",
         "met": met_at_least(enc["model_vs_limit"], 0.8)},
        {"figure": "encode stage (shards -> store)", "value": f"{fmt(enc['stage_img_per_s'])} img/s = "
         f"{fmt(enc['stage_vs_model'], pct=True)} of model-only", "target": ">= 85% of model-only",
         "met": met_at_least(enc["stage_vs_model"], 0.85)},
        {"figure": "train default recipe (per-example)", "value": f"{fmt(tr['samples_per_s_per-example'])} samples/s "
         f"= {fmt(tr['vs_limit'], pct=True)} of {used}", "target": ">= 40% of limit",
         "met": met_at_least(tr["vs_limit"], 0.4)},
        {"figure": "train per-batch mixing", "value": f"{fmt(tr['samples_per_s_per-batch'])} samples/s"},
        {"figure": "train seed-style baseline", "value": f"{fmt(tr['samples_per_s_baseline'])} samples/s; ours "
         f"{fmt(tr['speedup_vs_baseline'], 1)}x", "target": ">= 8x", "met": met_at_least(tr["speedup_vs_baseline"], 8)},
        {"figure": "loader (store streaming)", "value": f"{fmt(ld['gb_per_s'])} GB/s, "
         f"{ld['samples_per_s']['median']:.0f} samples/s", "target": ">= 1 GB/s", "met": met_at_least(ld["gb_per_s"], 1.0)},
        {"figure": f"generate, {gen['new_tokens']} tokens", "value": f"img/s greedy {fmt(gen['cache_img_per_s'], 1)}, "
         f"beam 3 {fmt(gen['beam3_img_per_s'], 1)}, parallel {fmt(gen['parallel_img_per_s'], 1)}; KV cache "
         f"{fmt(gen['kv_speedup'], 1)}x greedy without", "target": ">= 3x", "met": met_at_least(gen["kv_speedup"], 3)},
    ]
    if e2e:
        parts = ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in e2e.items() if v is not None and k != "total_s")
        total = e2e.get("total_s")
        figs.append({"figure": "last make all (stage records)", "value": parts + (
            f"; total {total / 60:.1f} min" if total else ""), "target": "<= 30 min",
            "met": None if total is None else total <= 1800})
    return figs


def run(cfg: BenchConfig) -> dict:
    import torch

    from pipeline.devices import machine_kind, resolve_device, resolve_precision

    device = resolve_device(cfg.device)  # every measurement's inputs and models are made on this one device
    precision = resolve_precision(cfg.precision, device)
    repeats = min(cfg.repeats, 2) if cfg.quick else cfg.repeats
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    kind = machine_kind(device)
    console.print(f"[bold]bench[/] on {machine_name(device)} ({kind}); precision {precision}; "
                  f"{'quick' if cfg.quick else 'full'}, {repeats} interleaved rounds")
    t0 = time.perf_counter()
    limit = bench_limit(device, cfg.quick, sync, repeats)
    workers = max(EncodeConfig.workers, (os.cpu_count() or 1) - 1) if device.type == "cuda" else EncodeConfig.workers
    with tempfile.TemporaryDirectory(prefix="cappa-bench-") as tmp:
        work = Path(tmp)
        enc = bench_encode(device, precision, cfg.quick, sync, work, limit, repeats, workers=workers)
        tr = bench_train(device, precision, cfg.quick, sync, limit, repeats)
        ld = bench_loader(device, cfg.quick, work, repeats, image_tokens=enc["tokens"], image_width=enc["width"])
        gen = bench_generate(device, precision, cfg.quick, sync, repeats, image_tokens=enc["tokens"])
    result = {
        "kind": kind, "device": device.type, "machine": machine_name(device), "precision": precision,
        "date": date.today().isoformat(), "commit": git_commit(), "quick": cfg.quick, "repeats": repeats,
        "limit": limit, "encode": enc, "train": tr, "loader": ld, "generate": gen, "end_to_end": end_to_end(),
    }
    result["figures"] = figures_of(result, precision)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json, write_md = outputs_plan(cfg)
    if write_json:
        write_outputs(cfg, result, markdown=write_md)
    from rich.table import Table

    table = Table(title=f"bench: {result['machine']} ({kind}, {precision}); median (min-max) of {repeats} rounds")
    for col in ("figure", "value", "target", "met"):
        table.add_column(col)
    for f in result["figures"]:
        met = "" if f.get("met") is None else ("[green]yes[/]" if f["met"] else "[red]no[/]")
        table.add_row(f["figure"], f["value"], f.get("target", ""), met)
    console.print(table)
    wrote = [str(p) for p, w in ((cfg.json, write_json), (cfg.markdown, write_md)) if w]
    console.print(f"{'wrote ' + ' and '.join(wrote) if wrote else 'quick run: nothing written (pass --json PATH to keep it)'}"
                  f" in {result['wall_s']} s", highlight=False)
    return result
