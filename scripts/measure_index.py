"""Open + index time and memory of a big store with tiny features; caption tokens, first and cached.

    python scripts/measure_index.py --rows 200000 --store /tmp/big.zarr [--code DIR] [--tokens]

Builds the store once (1 token x 8 wide, img2dataset-like keys, captions and metadata), then in this
process: open + index (seconds, RSS before and after, peak RSS), and with --tokens the caption ids
through the token cache (first: built; second process run: hit). --code DIR measures another
checkout's pipeline (e.g. one made by `git archive` of an older commit) on the same store.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

WORDS = ("a man woman dog cat red blue small large people standing sitting near the of on in "
         "with street water beach city tree car train table food plate white black young old "
         "group").split()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def build(path: Path, rows: int, capacity: int = 256) -> None:
    import numpy as np

    from pipeline.store import FeatureStore

    shards = -(-rows // capacity)
    encoder = {"model": "toy", "weights": {"kind": "random-init", "seed": 0}}
    st = FeatureStore.create(path, encoder=encoder, tokens=1, width=8, shard_capacity=capacity,
                             shards=[f"{s:05d}.tar" for s in range(shards)])
    rng = np.random.default_rng(0)
    for s in range(shards):
        n = min(capacity, rows - s * capacity)
        keys = [f"{s:05d}{i:04d}" for i in range(n)]
        caps = [" ".join(rng.choice(WORDS, rng.integers(6, 18))) for _ in range(n)]
        host = "https://images.example.com/photos"
        meta = [json.dumps({"url": f"{host}/{k}/{rng.integers(1 << 62):x}.jpg",
                            "caption": c, "key": k, "status": "success", "error_message": None,
                            "width": 224, "height": 224,
                            "original_width": int(rng.integers(200, 2000)),
                            "original_height": int(rng.integers(200, 2000)),
                            "exif": json.dumps({"Image Make": "Canon", "Image Model": "EOS 5D"}),
                            "sha256": f"{rng.integers(1 << 62):064x}"}) for k, c in zip(keys, caps)]
        st.write_shard(s, rng.standard_normal((n, 1, 8)).astype(np.float16), keys, caps, meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--code", type=Path, help="measure this checkout's pipeline instead")
    ap.add_argument("--tokens", action="store_true",
                    help="also the caption ids through the token cache")
    args = ap.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code))
    if not args.store.exists():
        t = time.perf_counter()
        build(args.store, args.rows)
        print(f"built {args.store} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    from pipeline.store import FeatureStore

    before = rss_mb()
    t = time.perf_counter()
    index = FeatureStore.open(args.store).index()
    out = {"code": str(args.code or "this checkout"), "rows": len(index),
           "open_index_s": round(time.perf_counter() - t, 2),
           "rss_index_mb": round(rss_mb() - before, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if args.tokens:
        from pipeline import token_cache
        from pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer("gpt2")
        before, t = rss_mb(), time.perf_counter()
        got = token_cache.caption_token_ids(index, tok, 64)
        out.update(tokens_s=round(time.perf_counter() - t, 2), token_cache=got.cache,
                   rss_tokens_mb=round(rss_mb() - before, 1),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
