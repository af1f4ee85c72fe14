"""Probe what the cached encoder features allow: per synthetic attribute, probe accuracy on the trainer's val split.

Issue #13 asks, for a target the decoder misses, whether the features carry it at all. Per primary-object
attribute (colour, shape, size, position, count; the ground truth eval scores against: each sample's
`attributes` metadata in the store, reduced by `captions.primary_attributes`) this fits, on the trainer's
train split (`loader.split_positions(keys, val_fraction)`), and scores on its val split:

  cls        multinomial logistic regression (L-BFGS, L2) on the CLS token             [768]
  mean       the same on the mean of the 196 patch tokens                              [768]
  flat       kernel ridge classifier (linear kernel, dual form) on all 197 x 768 tokens [151,296]
  attn       attention pooling: one learned query per attribute, softmax over the 197 tokens, then linear
             (one cross-attention read: q.Wk.x folds into one vector per query, Wv into the linear head)
  attn4      the same with 4 queries per attribute (4 heads), their pooled tokens concatenated
  pixels16   logistic regression on the image itself, 16x16 RGB (area-downsampled)     [768]
  pixels32   the same at 32x32                                                          [3,072]

Hyper-parameters (L2 strength, ridge lambda; for attn also the epoch) are chosen on a seeded 10% hold-out of
the train split; cls / mean / flat / pixels are then refitted on the whole train split; attn keeps the model
trained on the other 90%. Features are z-scored per dimension with train statistics. The floor is
`metrics.chance_accuracy` on the val split (always naming the most frequent value).

`--decoder` adds the trained run's parallel decoding with mask-predict refinement (`parallel_decode(features,
refine_steps=N)`) on the same val split: attribute accuracy, CIDEr (5 references, METEOR skipped) and how many
captions are whole (see `metrics.caption_form`).

    python scripts/probe_features.py --store cache/features.zarr --out docs/probes.png --json docs/probes.json \
        [--decoder --run cache/runs/default --refine-steps 0,1,2,4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import captions, metrics  # noqa: E402
from pipeline.loader import FeatureSource, split_positions  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402

ATTRS = captions.ATTRIBUTES
PROBES = ("cls", "mean", "flat", "attn", "attn4", "pixels16", "pixels32")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


# --- data ------------------------------------------------------------------------------------------------------
def labels_of(index) -> tuple[np.ndarray, list]:
    """[N, 5] int class ids (index into captions.VOCAB[attr]) and the raw attributes per sample."""
    raw = [captions.meta_attributes(m) for m in index.meta]
    if any(a is None for a in raw):
        raise SystemExit("some samples carry no synthetic attributes: probes need the synthetic source")
    y = np.empty((len(raw), len(ATTRS)), dtype=np.int64)
    for i, a in enumerate(raw):
        p = captions.primary_attributes(a)
        y[i] = [captions.VOCAB[k].index(p[k]) for k in ATTRS]
    return y, raw


def load_pixels(meta: list[str], images: Path, side: int) -> np.ndarray:
    """[N, side*side*3] float32 in [0, 1]: each sample's source image (the file its metadata `url` names, in
    `images`; the whole canvas) area-downsampled."""
    from PIL import Image

    out = np.empty((len(meta), side * side * 3), dtype=np.float32)
    for i, m in enumerate(meta):
        with Image.open(images / json.loads(m)["url"].rsplit("/", 1)[-1]) as im:
            out[i] = np.asarray(im.convert("RGB").resize((side, side), Image.BOX), dtype=np.float32).ravel() / 255
    return out


# --- probes ----------------------------------------------------------------------------------------------------
def zscore(x_fit: torch.Tensor, *others: torch.Tensor):
    mu, sd = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
    return [(t - mu) / sd for t in (x_fit, *others)]


def logistic_fit(x: torch.Tensor, y: torch.Tensor, c: int, l2: float, iters: int = 150):
    """Multinomial logistic regression, mean CE + l2 * |W|^2, L-BFGS. -> (W [D, C], b [C])."""
    w = torch.zeros(x.shape[1], c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def linear_probe(x_tr: torch.Tensor, y_tr: np.ndarray, x_va: torch.Tensor, y_va: np.ndarray, fit: np.ndarray,
                 hold: np.ndarray, grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """Per attribute: L2 chosen on (fit -> hold) positions of the train rows, refit on all train rows."""
    res = {}
    xf, xh = zscore(x_tr[fit], x_tr[hold])
    xt, xv = zscore(x_tr, x_va)
    for j, a in enumerate(ATTRS):
        c = len(captions.VOCAB[a])
        yf, yh = torch.from_numpy(y_tr[fit, j]), torch.from_numpy(y_tr[hold, j])
        hold_acc = {}
        for l2 in grid:
            w, b = logistic_fit(xf, yf, c, l2)
            hold_acc[l2] = acc(xh @ w + b, yh)
        best = max(grid, key=lambda g: (hold_acc[g], g))  # ties: the stronger penalty
        w, b = logistic_fit(xt, torch.from_numpy(y_tr[:, j]), c, best)
        res[a] = {"val": acc(xv @ w + b, torch.from_numpy(y_va[:, j])),
                  "train": acc(xt @ w + b, torch.from_numpy(y_tr[:, j])),
                  "l2": best, "hold": hold_acc[best]}
    return res


def flat_gram(feats: torch.Tensor, train_rows: np.ndarray, chunk: int = 6144) -> torch.Tensor:
    """Linear kernel of all tokens flattened and z-scored per dimension (train statistics), / D. -> [N, N]."""
    n = feats.shape[0]
    flat = feats.view(n, -1)  # [N, P*E] fp16, no copy
    d = flat.shape[1]
    gram = torch.zeros(n, n, dtype=torch.float64)
    tr = torch.from_numpy(train_rows)
    for lo in range(0, d, chunk):
        x = flat[:, lo:lo + chunk].float()  # [N, c]
        xt = x.index_select(0, tr)
        x = (x - xt.mean(0)) / xt.std(0).clamp_min(1e-6)
        gram += (x @ x.T).double()
    return (gram / d).float()


def one_hot_pm(y: np.ndarray, c: int) -> torch.Tensor:
    t = torch.full((len(y), c), -1.0, dtype=torch.float64)
    t[torch.arange(len(y)), torch.from_numpy(y)] = 1.0
    return t


def kernel_ridge(k_aa: torch.Tensor, y_a: np.ndarray, k_bs: list[torch.Tensor], lam: float) -> list[list[torch.Tensor]]:
    """Ridge classifiers in dual form, one per attribute (columns of y_a), sharing one Cholesky factor: targets
    one-hot in {-1, 1}, centred. -> per k_b in k_bs, per attribute: scores [nb, C]."""
    ys = [one_hot_pm(y_a[:, j], len(captions.VOCAB[a])) for j, a in enumerate(ATTRS)]
    ybar = [t.mean(0) for t in ys]
    chol = torch.linalg.cholesky(k_aa.double() + lam * torch.eye(len(y_a), dtype=torch.float64))
    alpha = torch.cholesky_solve(torch.cat([t - m for t, m in zip(ys, ybar)], 1), chol)
    alphas = alpha.split([t.shape[1] for t in ys], 1)
    return [[(k_b.double() @ al + m).float() for al, m in zip(alphas, ybar)] for k_b in k_bs]


def flat_probe(gram: torch.Tensor, tr: np.ndarray, va: np.ndarray, y: np.ndarray, fit: np.ndarray,
               hold: np.ndarray, grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> dict:
    """`fit` / `hold` are positions into `tr`. lambda is relative to the kernel's mean diagonal (~1)."""
    scale = float(gram.diagonal()[torch.from_numpy(tr)].mean())
    g = lambda a, b: gram[torch.from_numpy(a)][:, torch.from_numpy(b)]  # noqa: E731
    f, h = tr[fit], tr[hold]
    kff, khf, ktt, kvt = g(f, f), g(h, f), g(tr, tr), g(va, tr)
    hold_acc = {}  # lambda -> per attribute
    for lam in grid:
        (scores,) = kernel_ridge(kff, y[f], [khf], lam * scale)
        hold_acc[lam] = [acc(s, torch.from_numpy(y[h, j])) for j, s in enumerate(scores)]
    best = {a: max(grid, key=lambda lam: (hold_acc[lam][j], lam)) for j, a in enumerate(ATTRS)}
    res = {}
    for lam in sorted(set(best.values())):
        s_tr, s_va = kernel_ridge(ktt, y[tr], [ktt, kvt], lam * scale)
        for j, a in enumerate(ATTRS):
            if best[a] == lam:
                res[a] = {"val": acc(s_va[j], torch.from_numpy(y[va, j])),
                          "train": acc(s_tr[j], torch.from_numpy(y[tr, j])), "lambda": lam, "hold": hold_acc[lam][j]}
    return {a: res[a] for a in ATTRS}


class AttnProbe(torch.nn.Module):
    """For every (attribute, L2 setting): H queries over the tokens, softmax attention, then a linear head on the
    H pooled tokens. All heads train together in one pass over the data, but share no parameters (and the loss
    is a sum), so each is what it would be alone."""

    def __init__(self, width: int, classes: list[int], copies: int, heads: int):
        super().__init__()
        self.classes, self.copies, self.heads = classes, copies, heads
        q = len(classes) * copies * heads
        self.query = torch.nn.Parameter(torch.randn(q, width) * width ** -0.5)
        self.out = torch.nn.ModuleList(torch.nn.Linear(heads * width, c) for c in classes for _ in range(copies))

    def forward(self, x):  # x [B, P, E] z-scored -> list of logits per (attribute, copy)
        s = torch.einsum("bpe,qe->bqp", x, self.query) * x.shape[-1] ** -0.5  # [B, Q, P]
        pooled = torch.einsum("bqp,bpe->bqe", s.softmax(-1), x)  # [B, Q, E]
        pooled = pooled.view(x.shape[0], len(self.out), self.heads * x.shape[-1])
        return [head(pooled[:, i]) for i, head in enumerate(self.out)]


def attn_probe(feats: torch.Tensor, y: np.ndarray, fit: np.ndarray, hold: np.ndarray, va: np.ndarray, *,
               heads: int, epochs: int, grid=(1e-4, 1e-2), batch: int = 128, lr: float = 3e-3, seed: int = 0) -> dict:
    """Adam, mean CE + l2 * |head weights|^2, bf16 autocast; per attribute the (l2, epoch) with the best hold-out
    accuracy. To keep the 2 cores' memory traffic down, the fit rows are z-scored once (bf16) in one seeded
    shuffled order and cut into fixed batches; each epoch visits those batches in a new order."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(fit)
    rows_all = np.concatenate([order, hold, va])
    sub = feats[torch.from_numpy(order[: min(len(order), 1024)])].float()  # channel statistics from fit rows
    mu, sd = sub.mean((0, 1)), sub.std((0, 1)).clamp_min(1e-6)
    del sub
    x = torch.empty(len(rows_all), *feats.shape[1:], dtype=torch.bfloat16)
    for i in range(0, len(rows_all), 256):
        x[i:i + 256] = ((feats[torch.from_numpy(rows_all[i:i + 256])].float() - mu) / sd).bfloat16()
    nf, nh = len(order), len(hold)
    y_all = torch.from_numpy(y[rows_all])
    classes = [len(captions.VOCAB[a]) for a in ATTRS]
    k = len(grid)
    model = AttnProbe(feats.shape[-1], classes, k, heads)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    l2s = [g for _ in ATTRS for g in grid]
    hist = []  # per epoch: (hold acc, val acc) per head

    def evaluate(lo, hi):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [torch.cat(o).float() for o in zip(*(model(x[i:min(i + 256, hi)]) for i in range(lo, hi, 256)))]
        return [acc(o, y_all[lo:hi, i // k]) for i, o in enumerate(outs)]

    starts = np.arange(0, nf, batch)
    for ep in range(epochs):
        model.train()
        for lo in rng.permutation(starts):
            hi = min(lo + batch, nf)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs = model(x[lo:hi])
            loss = sum(torch.nn.functional.cross_entropy(o.float(), y_all[lo:hi, j // k]) for j, o in enumerate(outs))
            loss = loss + sum(l2 * (h.weight ** 2).sum() for l2, h in zip(l2s, model.out))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        hist.append((evaluate(nf, nf + nh), evaluate(nf + nh, len(rows_all))))
        log(f"  attn epoch {ep + 1}/{epochs}: hold " + " ".join(
            f"{a}:{max(hist[-1][0][j * k:(j + 1) * k]):.2f}" for j, a in enumerate(ATTRS)))
    res = {}
    for j, a in enumerate(ATTRS):
        cands = [(h[0][j * k + g], grid[g], -ep, g) for ep, h in enumerate(hist) for g in range(k)]
        hold_acc, _, ep, g = max(cands)  # best hold accuracy; ties: the stronger L2, then the earlier epoch
        res[a] = {"val": hist[-ep][1][j * k + g], "hold": hold_acc, "epoch": 1 - ep, "l2": grid[g],
                  "val_last_epoch": hist[-1][1][j * k + g]}
    return res


# --- the trained decoder's parallel decoding -----------------------------------------------------------------
def form_shares(captions: list[str], seen_bigrams: set) -> dict:
    f = [metrics.caption_form(c, seen_bigrams) for c in captions]
    return {k: sum(x[k] for x in f) / len(f) for k in ("all_five", "seen_bigrams", "whole")}


def decoder_refinement(run: Path, store_path: Path, steps: list[int], batch: int) -> dict:
    from pipeline.trained_run import load_run, open_run_store, trained_precision

    from pipeline.devices import autocast_dtype, run_precision

    device = torch.device("cpu")
    loaded = load_run(run, device)
    dec, tok, rec = loaded.decoder, loaded.tokenizer, loaded.record
    precision = run_precision("auto", device, trained_precision(loaded.path, rec))
    amp = autocast_dtype(precision)
    store = open_run_store(rec, store_path)
    index = store.index()
    vf = float(rec.get("split", {}).get("val_fraction", rec.get("train", {}).get("val_fraction")))
    tr, va = split_positions(index.keys, vf)
    feats = FeatureSource(store, index.rows[va], device=device, placement="memory",
                          slab_rows=store.shard_capacity).held
    keys = [index.keys[i] for i in va]
    meta = index.meta_of(va)  # the validation rows' metadata only
    truth = {k: captions.meta_attributes(m) for k, m in zip(keys, meta)}
    refs = {k: captions.meta_references(m, index.captions[i]) for k, m, i in zip(keys, meta, va)}
    seen = metrics.caption_bigrams(index.captions[i] for i in tr)
    log(f"decoder {loaded.ckpt} (step {loaded.step}, {loaded.chosen}), {precision}, {len(va)} val samples")
    caps, out = {}, {"checkpoint": str(loaded.ckpt), "step": loaded.step, "precision": precision,
                     "val": len(va), "modes": {}}
    for n in steps:
        t = time.perf_counter()
        got = []
        for i in range(0, len(va), batch):
            with torch.no_grad(), torch.autocast("cpu", dtype=amp) if amp is not None else torch.no_grad():
                ids = dec.parallel_decode(feats[i:i + batch].float(), refine_steps=n)
            got += tok.decode_batch(ids.cpu())
        caps[f"refine_{n}"] = dict(zip(keys, got))
        out["modes"][f"refine_{n}"] = {"refine_steps": n, "decode_s": time.perf_counter() - t,
                                       "attributes": metrics.attribute_accuracy(caps[f"refine_{n}"], truth),
                                       "form": form_shares(got, seen), "first_captions": got[:3]}
        log(f"  refine {n}: {time.perf_counter() - t:.1f} s; {out['modes'][f'refine_{n}']['attributes']}")
    ev = run / "eval" / "eval.json"
    if ev.is_file():  # eval's greedy captions of the same val split, for the form shares beside
        samples = json.loads(ev.read_text())["samples"]
        if [s["key"] for s in samples] == keys:
            caps["greedy_eval"] = {s["key"]: s["greedy"] for s in samples}
            out["modes"]["greedy_eval"] = {"attributes": metrics.attribute_accuracy(caps["greedy_eval"], truth),
                                           "form": form_shares([s["greedy"] for s in samples], seen)}
    t = time.perf_counter()
    coco = metrics.coco_metrics_many(refs, caps, meteor=False)
    for m, sc in coco.items():
        out["modes"][m]["coco"] = sc
    out["coco_s"] = time.perf_counter() - t
    out["chance"] = metrics.chance_accuracy(truth.values())
    out["form_definition"] = metrics.caption_form.__doc__.split("? ", 1)[-1].replace("\n   ", "").strip()
    return out


# --- chart -----------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [p for p in PROBES if p in result["probes"]]
    labels = {"cls": "linear: CLS", "mean": "linear: mean patch", "flat": "linear: all 197x768 (kernel ridge)",
              "attn": "attention pooling, 1 query", "attn4": "attention pooling, 4 queries", "pixels16": "pixels 16x16 (control)", "pixels32": "pixels 32x32 (control)"}
    colours = {"cls": "#9ecae1", "mean": "#6baed6", "flat": "#2171b5", "attn": "#6a51a3", "attn4": "#3f007d", "pixels16": "#bdbdbd",
               "pixels32": "#737373"}
    fig, ax = plt.subplots(figsize=(11, 4.8))
    w = 0.8 / max(len(probes), 1)
    for j, a in enumerate(ATTRS):
        for k, p in enumerate(probes):
            x = j - 0.4 + w * (k + 0.5)
            ax.bar(x, result["probes"][p][a]["val"], w, color=colours[p], label=labels[p] if j == 0 else None)
        ax.hlines(result["chance"][a], j - 0.45, j + 0.45, colors="red", linestyles="--",
                  label="chance (majority value)" if j == 0 else None)
        g = (result.get("decoder_greedy") or {}).get(a)
        if g is not None:
            ax.plot([j], [g], marker="*", color="orange", markersize=16, markeredgecolor="black", linestyle="none",
                    label="trained decoder, greedy" if j == 0 else None)
    ax.set_xticks(range(len(ATTRS)), ATTRS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"val accuracy (n={result['split']['val']})")
    ax.set_title("what the random-init ViT-B/16 features separate: probes on cache/features.zarr (val split)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("cache/features.zarr"))
    ap.add_argument("--out", type=Path, default=Path("docs/probes.png"), help="the bar chart (PNG)")
    ap.add_argument("--json", type=Path, default=Path("docs/probes.json"))
    ap.add_argument("--images", type=Path, default=Path("data/synthetic/images"), help="for the pixel controls")
    ap.add_argument("--run", type=Path, default=Path("cache/runs/default"),
                    help="the trained run: its val_fraction, eval's greedy accuracy, and --decoder")
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--val-fraction", type=float, default=None, help="default: the run's, else 0.05")
    ap.add_argument("--hold-fraction", type=float, default=0.1)
    ap.add_argument("--attn-epochs", type=int, default=60)
    ap.add_argument("--attn-lr", type=float, default=1e-2)
    ap.add_argument("--decoder", action="store_true", help="also measure parallel decoding with refinement")
    ap.add_argument("--refine-steps", default="0,1,2,4")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update", action="store_true",
                    help="keep the probes / decoder results already in --json that this call does not recompute")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    probes = [p for p in args.probes.split(",") if p]
    bad = set(probes) - set(PROBES)
    if bad:
        ap.error(f"unknown probes {sorted(bad)}; choose from {PROBES}")

    cfg = args.run / "config.json"
    vf = args.val_fraction
    if vf is None:
        vf = json.loads(cfg.read_text()).get("split", {}).get("val_fraction", 0.05) if cfg.is_file() else 0.05
    store = FeatureStore.open(args.store)
    index = store.index()
    y, raw = labels_of(index)
    tr, va = split_positions(index.keys, float(vf))
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(tr))
    n_hold = int(round(args.hold_fraction * len(tr)))
    hold, fit = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])  # positions into tr
    result = {"store": str(args.store), "encoder": store.encoder, "random_init": bool(store.is_random_init),
              "split": {"val_fraction": float(vf), "train": int(len(tr)), "val": int(len(va)),
                        "hold_out_of_train": int(n_hold)},
              "chance": metrics.chance_accuracy([raw[i] for i in va]),
              "chance_train_majority_on_val": {a: float(np.mean(y[va, j] == np.bincount(y[tr, j]).argmax()))
                                               for j, a in enumerate(ATTRS)},
              "probes": {}, "timing": {}}
    ev = args.run / "eval" / "eval.json"
    if ev.is_file():
        e = json.loads(ev.read_text())
        result["decoder_greedy"] = (e.get("attributes") or {}).get("greedy")
        result["decoder_greedy_source"] = str(ev)
    log(f"{len(index)} samples: train {len(tr)} (hold-out {n_hold}), val {len(va)}; torch threads "
        f"{torch.get_num_threads()}")

    feats = None
    if any(p in probes for p in ("cls", "mean", "flat", "attn")):
        t = time.perf_counter()
        feats = FeatureSource(store, index.rows, device=torch.device("cpu"), placement="memory",
                              slab_rows=store.shard_capacity).held  # [N, P, E] fp16
        result["timing"]["load_features_s"] = time.perf_counter() - t
        log(f"features {tuple(feats.shape)} {feats.dtype} loaded in {result['timing']['load_features_s']:.1f} s")

    def record(name, res, t):
        result["probes"][name] = res
        result["timing"][name + "_s"] = time.perf_counter() - t
        log(f"{name} ({result['timing'][name + '_s']:.0f} s): " + ", ".join(f"{a} {res[a]['val']:.3f}" for a in ATTRS))

    for name in ("cls", "mean"):
        if name in probes:
            t = time.perf_counter()
            x = feats[:, 0].float() if name == "cls" else feats[:, 1:].float().mean(1)
            record(name, linear_probe(x[tr], y[tr], x[va], y[va], fit, hold), t)
    if "flat" in probes:
        t = time.perf_counter()
        gram = flat_gram(feats, tr)
        result["timing"]["flat_gram_s"] = time.perf_counter() - t
        log(f"flat Gram {tuple(gram.shape)} in {result['timing']['flat_gram_s']:.0f} s")
        record("flat", flat_probe(gram, tr, va, y, fit, hold), t)
        del gram
    for name, heads in (("attn", 1), ("attn4", 4)):
        if name in probes:
            t = time.perf_counter()
            res = attn_probe(feats, y, tr[fit], tr[hold], va, heads=heads, epochs=args.attn_epochs, lr=args.attn_lr,
                             seed=args.seed)
            record(name, res, t)
            result.setdefault("attn_settings", {})[name] = {
                "queries_per_attribute": heads, "epochs": args.attn_epochs, "lr": args.attn_lr, "batch": 128,
                "l2_grid": [1e-4, 1e-2], "trained_on": "90% of train (the rest chose l2 and epoch)"}
    del feats
    for side in (16, 32):
        name = f"pixels{side}"
        if name in probes:
            t = time.perf_counter()
            px = torch.from_numpy(load_pixels(index.meta, args.images, side))
            record(name, linear_probe(px[tr], y[tr], px[va], y[va], fit, hold), t)

    if args.decoder:
        t = time.perf_counter()
        steps = [int(s) for s in args.refine_steps.split(",") if s != ""]
        result["decoder_refinement"] = decoder_refinement(args.run, args.store, steps, args.batch_size)
        result["timing"]["decoder_s"] = time.perf_counter() - t
    result["timing"]["total_s"] = time.perf_counter() - t0
    result["threads"] = torch.get_num_threads()
    for p in result["probes"].values():  # 95% Wilson interval of each val accuracy
        for a in ATTRS:
            k = round(p[a]["val"] * len(va))
            p[a]["val_ci95"] = wilson(k, len(va))
    if args.update and args.json.is_file():
        old = json.loads(args.json.read_text())
        result["probes"] = {**old.get("probes", {}), **result["probes"]}
        result["timing"] = {**old.get("timing", {}), **result["timing"]}
        for k in ("decoder_refinement", "attn_settings"):
            if k not in result and k in old:
                result[k] = old[k]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    if result["probes"]:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.out)
    log(f"wrote {args.json}" + (f" and {args.out}" if result["probes"] else "") +
        f" in {result['timing']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
