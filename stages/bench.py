"""`pipeline bench`: every stage measured against the machine's matmul limit and a seed-style baseline.

One process, warm-up then the median of several repeats. Results go to a JSON file and to a generated
table inside docs/BENCHMARKS.md (between markers; the hand-written analysis around it is kept).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

from pipeline.config import BenchConfig
from pipeline.progress import console

VIT_B16_GFLOP = 35.2  # forward, one 224x224 image (timm's count for vit_base_patch16_224)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def timed(fn: Callable[[], object], *, repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- 1. the limit --------------------------------------------------------------------------------------------
def matmul_rate(device, dtype, *, budget_s: float, sync) -> dict:
    """GFLOP/s of square matmuls, growing n until one product takes long enough to time well.

    The growth stops early on slow paths (bf16 on a CPU without native bf16 runs at ~1 GFLOP/s), so the
    measurement never takes minutes.
    """
    import torch

    n, best = 256, None
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = timed(lambda: a @ b, repeats=3, sync=sync)
        best = {"n": n, "gflops": 2 * n**3 / t / 1e9}
        if t * 8 > budget_s or n >= 8192:
            return best
        n *= 2


def bench_limit(device, quick: bool, sync) -> dict:
    import torch

    budget = 1.0 if quick else 3.0
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[name] = matmul_rate(device, dtype, budget_s=budget, sync=sync)
        console.print(f"  matmul {name}: {out[name]['gflops']:.1f} GFLOP/s (n={out[name]['n']})")
    return out


# --- 2. encode -------------------------------------------------------------------------------------------------
def bench_encode(device, precision: str, quick: bool, sync, workdir: Path) -> dict:
    """ViT-B/16 model-only img/s, then the whole stage (shards -> store) on freshly fetched synthetic shards."""
    import torch

    from pipeline.config import EncodeConfig, FetchConfig
    from pipeline.encoder import build_random
    from stages import encode as encode_stage
    from stages import fetch as fetch_stage

    model = "vit_base_patch16_224"
    enc = build_random(model, 0, device, precision)
    bs = 8 if quick else 16
    x = torch.randn(bs, 3, 224, 224)
    t = timed(lambda: enc.forward(x), repeats=2 if quick else 3, sync=sync)
    model_ips = bs / t
    console.print(f"  encode model-only: {model_ips:.2f} img/s")

    n = 48 if quick else 128
    shards = workdir / "shards"
    fetch_stage.run(FetchConfig(count=n, shards=shards, synthetic_dir=workdir / "synthetic",
                                samples_per_shard=32, broken_fraction=0.0, processes=1, threads=8))
    stage = encode_stage.run(EncodeConfig(shards=shards, store=workdir / "features.zarr", model=model,
                                          weights="random", batch_size=bs, device=device.type, precision=precision))
    return {"model": model, "batch_size": bs, "model_img_per_s": model_ips,
            "model_gflops": model_ips * VIT_B16_GFLOP, "stage_img_per_s": stage["img_per_s"],
            "stage_images": stage["images"], "store": str(workdir / "features.zarr")}


# --- 3. train ---------------------------------------------------------------------------------------------------
def _captions(n: int) -> list[str]:
    from pipeline.synthetic import make_row

    return [make_row(0, i)[1] for i in range(n)]


def bench_train(device, precision: str, quick: bool, sync) -> dict:
    """Seed-config decoder steps on cached-feature-shaped inputs, batched as the trainer batches them (a window
    of 16 batches sorted by caption length), vs a seed-style step (ViT every step, fp32, fixed padding to 77,
    full logits); per-example vs per-batch mixing."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.devices import autocast_dtype
    from pipeline.encoder import build_random
    from pipeline.model import CaptionDecoder, DecoderConfig, absorb_cross, flops_per_sample
    from pipeline.tokenizer import load_tokenizer
    from stages.train import make_optimizer

    bs = 8 if quick else 32
    reps = 2
    tok = load_tokenizer("gpt2")
    # The trainer's batches: one window of `length_buckets` batches sorted by caption extent; time an evenly
    # spaced sample of them (short to long), so the mix of padded lengths is the training run's.
    window = TrainConfig.length_buckets
    pool_t, pool_m = tok.encode_batch(_captions(bs * window), 77)
    extent = (pool_m * torch.arange(1, pool_m.shape[1] + 1)).amax(1)
    srt = torch.argsort(extent, stable=True)
    picks = (window // 4, 3 * window // 4) if quick else tuple(range(window // 8, window, window // 4))
    batches = []
    for i in picks:
        idx = srt[i * bs:(i + 1) * bs]
        w = int(extent[idx].max())
        batches.append((pool_t[idx, :w].to(device), pool_m[idx, :w].to(device)))
    feats = torch.randn(bs, 197, 768, device=device)
    cfg = DecoderConfig()
    torch.manual_seed(0)
    dec = CaptionDecoder(cfg).to(device)
    opt = make_optimizer(dec, lr=1e-4, weight_decay=1e-4)
    amp = autocast_dtype(precision)
    gen = torch.Generator().manual_seed(0)

    def step(parallel, loss_fn):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(parallel)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours(mixing: str):
        def run():
            for targets, mask in batches:
                if mixing == "per-example":
                    par = (torch.rand(bs, generator=gen) < 0.75).to(device)
                else:
                    par = torch.full((bs,), bool(torch.rand(1, generator=gen) < 0.75), device=device)
                step(par, lambda p: dec.loss(feats, targets, mask, p)["loss"])
        return run

    n = bs * len(batches)
    real = [float(m.sum(1).float().mean()) for _, m in batches]
    cross = ["absorbed" if absorb_cross(t.shape[1], 197, cfg) else "kv" for t, _ in batches]
    out = {"batch_size": bs, "batches_timed": len(batches), "length_buckets": window,
           "mean_tokens": sum(real) / len(real), "padded_len": sum(t.shape[1] for t, _ in batches) / len(batches),
           "cross_attention": cross}
    for mixing in ("per-example", "per-batch"):
        t = timed(ours(mixing), repeats=reps, sync=sync)
        out[f"samples_per_s_{mixing}"] = n / t
        console.print(f"  train ({mixing}): {n / t:.2f} samples/s")
    # Model FLOPs at each batch's real tokens, in the form its cross-attention ran (and in the plain K/V form).
    fl = sum(flops_per_sample(cfg, r, 197, c)["train"] for r, c in zip(real, cross)) / len(batches)
    fl_kv = sum(flops_per_sample(cfg, r, 197, "kv")["train"] for r in real) / len(batches)
    out["train_gflop_per_sample"] = fl / 1e9
    out["train_gflop_per_sample_kv_form"] = fl_kv / 1e9
    out["train_gflops"] = out["samples_per_s_per-example"] * fl / 1e9

    # Seed-style baseline: the encoder runs inside every step (fp32), captions padded to 77, all 77 logits.
    vit = build_random("vit_base_patch16_224", 0, device, "fp32")
    images = torch.randn(bs, 3, 224, 224)
    dec.cross_mode = "kv"  # the seed's decoder: image K/V projected in every layer
    t77, m77 = tok.encode_batch(_captions(bs), 77)
    t77 = torch.nn.functional.pad(t77, (0, 77 - t77.shape[1]), value=tok.eos_id).to(device)
    m77 = torch.nn.functional.pad(m77, (0, 77 - m77.shape[1])).to(device)

    def seed_step():
        f = torch.from_numpy(vit.forward(images)).to(device).float()  # the encoder, every step
        par = torch.full((bs,), bool(torch.rand(1, generator=gen) < 0.75), device=device)  # the seed mixed per batch
        logits = dec(f, t77, m77, par)  # [B, 77, V]
        loss = torch.nn.functional.cross_entropy(logits[m77], t77[m77])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(seed_step, repeats=1 if quick else 2, sync=sync)
    out["baseline_samples_per_s"] = bs / t
    out["speedup_vs_baseline"] = out["samples_per_s_per-example"] / out["baseline_samples_per_s"]
    console.print(f"  seed-style baseline: {bs / t:.2f} samples/s -> {out['speedup_vs_baseline']:.1f}x")
    return out


# --- 4. loader --------------------------------------------------------------------------------------------------
def bench_loader(device, quick: bool, workdir: Path) -> dict:
    """Stream a store through the training loader (page cache warm): GB/s and samples/s."""
    import numpy as np

    from pipeline.loader import CaptionTokens, FeatureSource, Loader
    from pipeline.store import FeatureStore
    from pipeline.tokenizer import load_tokenizer

    n_shards, cap = (2, 256) if quick else (6, 256)
    path = workdir / "loader.zarr"
    enc = {"model": "bench", "weights": {"kind": "random-init", "seed": 0}}
    st = FeatureStore.create(path, encoder=enc, tokens=197, width=768, shard_capacity=cap,
                             shards=[f"{i:05d}" for i in range(n_shards)])
    rng = np.random.default_rng(0)
    caps = _captions(cap)
    for s in range(n_shards):
        feats = rng.standard_normal((cap, 197, 768), dtype=np.float32).astype(np.float16)
        st.write_shard(s, feats, [f"{s:05d}{i:04d}" for i in range(cap)], caps, [""] * cap)
    st = FeatureStore.open(path)
    index = st.index()
    tokens = CaptionTokens(load_tokenizer("gpt2"), index.captions, 77)

    def one_epoch():
        src = FeatureSource(st, index.rows, device=device, mode="stream", slab_rows=cap)
        loader = Loader(src, tokens, np.arange(len(index)), 32, seed=0)
        for b in loader.epoch(0):
            pass

    one_epoch()  # warm the page cache
    t = timed(one_epoch, repeats=2 if quick else 3, warmup=0)
    nbytes = len(index) * 197 * 768 * 2
    out = {"samples": len(index), "gb_per_s": nbytes / t / 1e9, "samples_per_s": len(index) / t}
    console.print(f"  loader: {out['gb_per_s']:.2f} GB/s, {out['samples_per_s']:.0f} samples/s")
    return out


# --- 5. generation ----------------------------------------------------------------------------------------------
def bench_generate(device, precision: str, quick: bool, sync) -> dict:
    """Greedy decoding of 32 new tokens with and without the KV cache, and beam 3 (seed-config decoder)."""
    import torch

    from pipeline.devices import autocast_dtype
    from pipeline.model import CaptionDecoder, DecoderConfig

    torch.manual_seed(0)
    dec = CaptionDecoder(DecoderConfig()).to(device).eval()
    torch.nn.init.normal_(dec.head.weight, std=0.02)  # a zero head would make every step's argmax trivial
    eos = dec.cfg.eos_id
    with torch.no_grad():
        dec.head.weight[eos] = -10.0  # never stop early: every row decodes all 32 tokens
    bs, new = (4 if quick else 8), 32
    feats = torch.randn(bs, 197, 768, device=device)
    amp = autocast_dtype(precision)
    out = {"batch_size": bs, "new_tokens": new}
    for name, kw in (("cache", dict(use_cache=True)), ("no_cache", dict(use_cache=False)),
                     ("beam3", dict(use_cache=True, beam_size=3))):
        def gen(kw=kw):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return dec.generate(feats, max_new_tokens=new, **kw)

        t = timed(gen, repeats=2 if quick else 3, sync=sync)
        out[f"{name}_tokens_per_s"] = bs * new / t
        console.print(f"  generate {name}: {bs * new / t:.0f} tokens/s")
    out["kv_speedup"] = out["cache_tokens_per_s"] / out["no_cache_tokens_per_s"]
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


def write_outputs(cfg: BenchConfig, result: dict) -> None:
    """Merge this device's results into the JSON (CPU and GPU side by side) and regenerate the table."""
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    all_results = json.loads(cfg.json.read_text()) if cfg.json.exists() else {}
    all_results[result["device"]] = result
    tmp = cfg.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(all_results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg.json)

    rows = ["| figure | value | target | met | device | machine | date | commit |",
            "|---|---|---|---|---|---|---|---|"]
    for dev, res in sorted(all_results.items()):
        for f in res["figures"]:
            met = "" if f.get("met") is None else ("yes" if f["met"] else "**no**")
            rows.append(f"| {f['figure']} | {f['value']} | {f.get('target', '')} | {met} | {dev} | "
                        f"{res['machine']} | {res['date']} | {res['commit']} |")
    table = "\n".join(rows)
    md = cfg.markdown.read_text() if cfg.markdown.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in md:
        md += f"\n{BEGIN}\n{END}\n"
    head, rest = md.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    cfg.markdown.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def run(cfg: BenchConfig) -> dict:
    import torch

    from pipeline.devices import resolve_device, resolve_precision

    device = resolve_device(cfg.device)
    precision = resolve_precision("auto", device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    console.print(f"[bold]bench[/] on {machine_name(device)}; precision {precision}; "
                  f"{'quick' if cfg.quick else 'full'}")
    t0 = time.perf_counter()
    limit = bench_limit(device, cfg.quick, sync)
    # The limit every ratio is taken against: the matmul rate of the precision the stages actually use
    # (on a CPU without native bf16 that is fp32; bf16 would be hundreds of times slower there).
    lim = limit["bf16" if precision == "bf16" else "fp32"]["gflops"]
    with tempfile.TemporaryDirectory(prefix="cappa-bench-") as tmp:
        work = Path(tmp)
        enc = bench_encode(device, precision, cfg.quick, sync, work)
        tr = bench_train(device, precision, cfg.quick, sync)
        ld = bench_loader(device, cfg.quick, work)
        gen = bench_generate(device, precision, cfg.quick, sync)
    e2e = end_to_end()
    used = f"{precision} limit"
    figures = [
        {"figure": "matmul fp32", "value": f"{limit['fp32']['gflops']:.1f} GFLOP/s"},
        {"figure": "matmul bf16", "value": f"{limit['bf16']['gflops']:.1f} GFLOP/s"},
        {"figure": "encode ViT-B/16 model-only", "value": f"{enc['model_img_per_s']:.2f} img/s = "
         f"{enc['model_gflops']:.0f} GFLOP/s = {_pct(enc['model_gflops'] / lim)} of {used}",
         "target": ">= 80% of limit", "met": enc["model_gflops"] / lim >= 0.8},
        {"figure": "encode stage (shards -> store)", "value": f"{enc['stage_img_per_s']:.2f} img/s = "
         f"{_pct(enc['stage_img_per_s'] / enc['model_img_per_s'])} of model-only",
         "target": ">= 85% of model-only", "met": enc["stage_img_per_s"] / enc["model_img_per_s"] >= 0.85},
        {"figure": "train seed config (per-example)", "value": f"{tr['samples_per_s_per-example']:.2f} samples/s = "
         f"{tr['train_gflops']:.0f} GFLOP/s = {_pct(tr['train_gflops'] / lim)} of {used}",
         "target": ">= 40% of limit", "met": tr["train_gflops"] / lim >= 0.4},
        {"figure": "train per-batch mixing", "value": f"{tr['samples_per_s_per-batch']:.2f} samples/s"},
        {"figure": "train seed-style baseline", "value": f"{tr['baseline_samples_per_s']:.2f} samples/s; "
         f"ours {tr['speedup_vs_baseline']:.1f}x", "target": ">= 8x", "met": tr["speedup_vs_baseline"] >= 8},
        {"figure": "loader (store streaming)", "value": f"{ld['gb_per_s']:.2f} GB/s, {ld['samples_per_s']:.0f} samples/s",
         "target": ">= 1 GB/s", "met": ld["gb_per_s"] >= 1.0},
        {"figure": "generate greedy, 32 tokens", "value": f"KV cache {gen['cache_tokens_per_s']:.0f} tok/s, "
         f"no cache {gen['no_cache_tokens_per_s']:.0f} tok/s = {gen['kv_speedup']:.1f}x; "
         f"beam 3 {gen['beam3_tokens_per_s']:.0f} tok/s", "target": ">= 3x", "met": gen["kv_speedup"] >= 3},
    ]
    if e2e:
        parts = ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in e2e.items() if v is not None and k != "total_s")
        total = e2e.get("total_s")
        figures.append({"figure": "last make all (stage records)", "value": parts + (
            f"; total {total / 60:.1f} min" if total else ""), "target": "<= 30 min",
            "met": None if total is None else total <= 1800})
    result = {
        "device": device.type, "machine": machine_name(device), "precision": precision,
        "date": date.today().isoformat(), "commit": git_commit(), "quick": cfg.quick,
        "limit": limit, "encode": enc, "train": tr, "loader": ld, "generate": gen, "end_to_end": e2e,
        "figures": figures, "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_outputs(cfg, result)
    from rich.table import Table

    table = Table(title=f"bench: {result['machine']} ({precision})")
    for col in ("figure", "value", "target", "met"):
        table.add_column(col)
    for f in figures:
        met = "" if f.get("met") is None else ("[green]yes[/]" if f["met"] else "[red]no[/]")
        table.add_row(f["figure"], f["value"], f.get("target", ""), met)
    console.print(table)
    console.print(f"wrote {cfg.json} and {cfg.markdown} in {result['wall_s']} s")
    return result
