"""Profile the trainer's own `train_step` at full size with machine-independent figures.

Per step: minor page faults (getrusage ru_minflt), user and kernel CPU seconds, wall seconds; over the run:
peak RSS; from torch.profiler: the top ops by self CPU time with their call counts; from a dispatch-level
census of one step: dtype casts (calls and bytes written), copies and fills. Rates are printed too, but on a
shared machine only the counts, shares and bytes are comparable between runs.

    python scripts/profile_step.py --precision bf16 --steps 8 --json /tmp/bf16.json
    python scripts/profile_step.py --precision bf16 --allocator system   # glibc's defaults: faults every step
    python scripts/profile_step.py --precision bf16 --weights master   # the opt-in bf16 working copy

Sizes default to the trainer's (TrainConfig: 6 x 768 decoder, vocab 50,258, batch 16, parallel fraction
0.75) with features [B, 197, 768] held in fp16 like the store and widened per step like the loader.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPS_OF_INTEREST = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::mm",
                   "aten::cat", "aten::add_", "aten::add")


def parse(argv=None) -> argparse.Namespace:
    from pipeline.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--weights", choices=("master", "autocast"), default="autocast",
                   help="bf16 only: bf16 weights with fp32 master weights (pipeline.precision), or autocast")
    p.add_argument("--allocator", choices=("tuned", "system"), default="tuned",
                   help="tuned: pipeline.memory's malloc settings (the trainer's); system: glibc's defaults")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (TrainConfig.compile)")
    p.add_argument("--steps", type=int, default=8, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=2, help="steps under torch.profiler (0: none)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--layers", type=int, default=TrainConfig.layers)
    p.add_argument("--width", type=int, default=TrainConfig.width)
    p.add_argument("--heads", type=int, default=TrainConfig.heads)
    p.add_argument("--mlp-dim", type=int, default=TrainConfig.mlp_dim)
    p.add_argument("--parallel-len", type=int, default=48, help="Lp (the default set's longest caption: 48)")
    p.add_argument("--parallel-fraction", type=float, default=TrainConfig.parallel_fraction)
    p.add_argument("--image-tokens", type=int, default=197)
    p.add_argument("--image-width", type=int, default=768)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compare-steps", type=int, default=0,
                   help="instead of profiling: the loss curve of this many steps with bf16 master weights and "
                        "with autocast, from the same init and batches")
    p.add_argument("--compare-fp32", action="store_true", help="with --compare-steps: an fp32 curve too")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    return p.parse_args(argv)


def make_batches(args, tok, n: int):
    """`n` trainer-like batches: synthetic captions (~22 tokens, EOS included) in a length-sorted window,
    evenly spaced from short to long, as the trainer's length buckets form them. -> [(targets, mask)]."""
    import torch

    from pipeline.synthetic import make_row

    from pipeline.config import TrainConfig

    bs, window = args.batch_size, max(TrainConfig.length_buckets, n)
    caps = [make_row(0, i)[1] for i in range(bs * window)]
    targets, mask = tok.encode_batch(caps, TrainConfig.max_len)
    extent = (mask * torch.arange(1, mask.shape[1] + 1)).amax(1)
    order = torch.argsort(extent, stable=True)
    out = []
    for j in range(n):
        idx = order[(j * window // n) * bs:(j * window // n + 1) * bs]
        w = int(extent[idx].max())
        out.append((targets[idx, :w], mask[idx, :w]))
    return out


def build(args):
    """The decoder, its TrainState (the trainer's own), and the batches' fixed parts."""
    import torch

    from pipeline.config import TrainConfig, decoder_config
    from pipeline.dist import Dist
    from pipeline.model import CaptionDecoder
    from pipeline.tokenizer import load_tokenizer
    from pipeline.training import TrainState

    tcfg = TrainConfig(batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                       layers=args.layers, width=args.width, heads=args.heads, mlp_dim=args.mlp_dim,
                       parallel_len=args.parallel_len)
    tok = load_tokenizer(tcfg.tokenizer)
    dec_cfg = decoder_config(tcfg, args.image_tokens, args.image_width, tok)
    torch.manual_seed(0)
    decoder = CaptionDecoder(dec_cfg)
    state = TrainState.create(decoder, tcfg, 10**6, args.precision, Dist(), torch.device("cpu"))
    return state, tok


def step_fn(args, state, tok):
    """A closure running one train_step on the next batch (features fp16 -> fp32 as the loader does)."""
    import torch

    from pipeline.loader import Batch
    from pipeline.training import train_step

    batches = make_batches(args, tok, 4)
    gen = torch.Generator().manual_seed(0)
    feats16 = [torch.randn(args.batch_size, args.image_tokens, args.image_width, generator=gen).half()
               for _ in batches]
    i = 0

    def one():
        nonlocal i
        targets, mask = batches[i % len(batches)]
        par = torch.rand(args.batch_size, generator=gen) < args.parallel_fraction
        b = Batch.of(feats16[i % len(batches)].float(), targets, mask, par, args.parallel_len)
        i += 1
        return train_step(state, b)

    return one, batches


def measure(one, steps: int) -> dict:
    """Per-step wall s, minor faults, user and kernel CPU s; medians and the run's kernel share."""
    rows = []
    for _ in range(steps):
        r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), os.times(), time.perf_counter()
        res = one()
        loss = float(res.sums.loss)  # the step's value, read after it ran
        t1, c1, r1 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": t1 - t0, "minflt": r1.ru_minflt - r0.ru_minflt, "user_s": c1.user - c0.user,
                     "sys_s": c1.system - c0.system, "loss": loss})
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "minflt", "user_s", "sys_s")}
    user, sys_ = sum(r["user_s"] for r in rows), sum(r["sys_s"] for r in rows)
    return {"median": med, "kernel_share": sys_ / max(user + sys_, 1e-9), "steps": rows}


def profile_ops(one, steps: int, top: int = 12) -> dict:
    """torch.profiler over `steps` steps: the top ops by self CPU time and the ops of interest (per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            one()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0

    def row(e):
        return {"op": e.key, "calls_per_step": e.count / steps, "self_cpu_share": e.self_cpu_time_total / total,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps}

    ranked = sorted(ev, key=lambda e: -e.self_cpu_time_total)
    named = {e.key: row(e) for e in ev if e.key in OPS_OF_INTEREST}
    # The memory-bound ops by input shape: which fills, adds and copies are the [V, D] / [T, V] ones.
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                       if e.key in ("aten::fill_", "aten::add", "aten::add_", "aten::copy_", "aten::cat")),
                      key=lambda e: -e.self_cpu_time_total)
    shaped = [{**row(e), "shapes": str(e.input_shapes)[:120]} for e in by_shape[:10]]
    return {"top": [row(e) for e in ranked[:top]], "of_interest": named, "memory_ops_by_shape": shaped,
            "total_self_cpu_ms_per_step": total / 1e3 / steps}


def cast_census(one) -> dict:
    """One step under a dispatch mode: dtype casts (tensors cast, bytes written), all copies, and the fills the
    step calls itself (fills inside other ops, such as dense zero gradients, show in the profiler's fill_)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"cast_calls": 0, "cast_bytes": 0, "copy_calls": 0, "copy_bytes": 0, "fill_calls": 0,
              "fill_bytes": 0}
    big: dict = {}

    def copied(src, out):
        nbytes = out.numel() * out.element_size()
        counts["copy_calls"] += 1
        counts["copy_bytes"] += nbytes
        if isinstance(src, torch.Tensor) and src.dtype != out.dtype:
            counts["cast_calls"] += 1
            counts["cast_bytes"] += nbytes
            key = f"{src.dtype}->{out.dtype} {list(out.shape)}"
            big[key] = big.get(key, 0) + nbytes

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("_to_copy", "copy_"):
                copied(args[0] if name == "_to_copy" else args[1], out)
            elif name == "_foreach_copy_":  # one call, a copy per tensor
                for dst, src in zip(args[0], args[1]):
                    copied(src, dst)
            elif name in ("fill_", "zero_", "zeros", "zeros_like", "new_zeros") and \
                    isinstance(out, torch.Tensor):
                counts["fill_calls"] += 1
                counts["fill_bytes"] += out.numel() * out.element_size()
            return out

    with Census():
        one()
    counts["largest_casts"] = sorted(big.items(), key=lambda kv: -kv[1])[:8]
    return counts


def _curve(args) -> list[float]:
    state, tok = build(args)
    one, _ = step_fn(args, state, tok)
    return [float(one().sums.loss) for _ in range(args.compare_steps)]


def compare_losses(args) -> dict:
    """Per-step losses of the bf16-weights step and the autocast step from the same init and batches."""
    curves = {}
    for weights in ("master", "autocast"):
        os.environ["PIPELINE_BF16_WEIGHTS"] = "1" if weights == "master" else "0"
        curves[weights] = _curve(args)
    if args.compare_fp32:  # the yardstick: how far autocast itself drifts from fp32 over the same steps
        curves["fp32"] = _curve(argparse.Namespace(**{**vars(args), "precision": "fp32"}))
        print("fp32:", " ".join(f"{x:.4f}" for x in curves["fp32"]))
        rel32 = [abs(x - y) / abs(y) for x, y in zip(curves["autocast"], curves["fp32"])]
        print(f"autocast vs fp32: max relative difference {max(rel32):.2e}")
    m, a = curves["master"], curves["autocast"]
    rel = [abs(x - y) / abs(y) for x, y in zip(m, a)]
    print(f"{'step':>4}{'bf16 weights':>14}{'autocast':>10}{'rel diff':>10}")
    for i, (x, y, r) in enumerate(zip(m, a, rel)):
        print(f"{i + 1:>4}{x:>14.4f}{y:>10.4f}{r:>10.2e}")
    print(f"max relative difference {max(rel):.2e} (bf16 rounding: 2^-8 = {2**-8:.2e})")
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            **curves, "max_rel_diff": max(rel)}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.allocator == "system":  # TrainState.create tunes the allocator unless told not to
        os.environ["PIPELINE_ALLOCATOR"] = "system"
    if args.compare_steps:
        out = compare_losses(args)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return out
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "bf16" and args.weights == "autocast":
        os.environ["PIPELINE_BF16_WEIGHTS"] = "0"  # pipeline.precision: keep autocast's per-use casts
    t0 = time.perf_counter()
    state, tok = build(args)
    one, batches = step_fn(args, state, tok)
    for _ in range(args.warmup):
        one()
    warm_s = time.perf_counter() - t0
    run = measure(one, args.steps)
    ops = profile_ops(one, args.profile_steps) if args.profile_steps else None
    census = cast_census(one)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "mean_real_tokens": statistics.mean(float(m.sum(1).float().mean()) for _, m in batches),
           "padded_len": statistics.mean(t.shape[1] for t, _ in batches),
           "build_and_warmup_s": warm_s, **run, "ops": ops, "census": census, "peak_rss_gb": peak_rss_gb}
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


def report(out: dict) -> None:
    a, m = out["args"], out["run_median"] if "run_median" in out else out["median"]
    print(f"{a['precision']} weights={a['weights']} allocator={a['allocator']} compile={a['compile']} "
          f"batch {a['batch_size']}, {a['layers']}x{a['width']}, Lp {a['parallel_len']}, "
          f"{out['mean_real_tokens']:.1f} real / {out['padded_len']:.1f} padded tokens, {out['threads']} threads")
    print(f"per step (median of {a['steps']}): wall {m['wall_s']:.2f} s, minor faults {m['minflt']:.0f}, "
          f"user {m['user_s']:.2f} s, kernel {m['sys_s']:.2f} s; kernel share {out['kernel_share']:.1%}; "
          f"peak RSS {out['peak_rss_gb']:.2f} GB")
    c = out["census"]
    print(f"census of one step: {c['cast_calls']} casts ({c['cast_bytes'] / 2**20:.0f} MiB written), "
          f"{c['copy_calls']} copies ({c['copy_bytes'] / 2**20:.0f} MiB), {c['fill_calls']} fills/zeros "
          f"({c['fill_bytes'] / 2**20:.0f} MiB)")
    for key, nbytes in c["largest_casts"]:
        print(f"  cast {key}: {nbytes / 2**20:.1f} MiB")
    if out["ops"]:
        print(f"{'op':<44}{'calls/step':>11}{'self CPU':>10}{'ms/step':>10}")
        for r in out["ops"]["top"]:
            print(f"{r['op'][:43]:<44}{r['calls_per_step']:>11.0f}{r['self_cpu_share']:>10.1%}"
                  f"{r['self_cpu_ms_per_step']:>10.0f}")
        print("memory-bound ops by input shape:")
        for r in out["ops"]["memory_ops_by_shape"]:
            print(f"  {r['op']:<14}{r['calls_per_step']:>5.0f} calls {r['self_cpu_share']:>6.1%}  {r['shapes']}")
        print("ops of interest: " + ", ".join(f"{k} {v['calls_per_step']:.0f} calls {v['self_cpu_share']:.1%}"
                                              for k, v in sorted(out["ops"]["of_interest"].items())))


if __name__ == "__main__":
    main()
