"""Shared fixtures: one tiny fetched data set, one tiny store and one tiny run per test session.

Each is built once through the real stages (img2dataset from a loopback server, a tiny timm ViT, a
tiny decoder), so every later test reads real artefacts.
"""

from __future__ import annotations

import os
import time

SESSION_START = time.time()  # wall clock when the test session began
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub

import pytest  # noqa: E402


# --- precisions and devices -----------------------------------------------------------------------
# Numeric tests pin their precision, so they hold whatever `--precision auto` picks on the machine
# that runs them (fp32 on an AVX2-only CPU, bf16 on AVX512-BF16 / AMX CPUs and GPUs); the
# precision-sensitive stages are run in both on every machine. bf16 on an AVX2-only CPU is ~300x
# slower than fp32, so the bf16 variants are tiny (a few steps, a 2 x 64 decoder, short captions).
PRECISIONS = ("fp32", "bf16")


# --- test tiers -----------------------------------------------------------------------------------
# `make test-fast` runs `-m "not slow and not cuda"`: the unit tier. A test is slow when it needs a
# fixture that fetches, encodes or trains (directly or through another fixture: item.fixturenames
# holds them all), when it belongs to the fault-injection suite (it kills and restarts real
# processes), or when it starts a process.
STAGE_FIXTURES = {"tiny_shards", "tiny_store", "tiny_run"}
# Tests that start a process (python, torchrun, bash, java, img2dataset's workers), by module, for
# test files that do not mark them where they are written.
SUBPROCESS_TESTS = {
    "test_bench": {"test_gpu_check_script_parses_and_its_plan_stays_out_of_the_users_folders",
                   "test_a_failing_stage_subprocess_is_one_user_error_with_its_last_line"},
    "test_fetch": {"test_cc_format_tsv_with_dead_links", "test_user_errors_are_one_line_exit_2"},
    "test_train": {"test_cli_missing_store_is_one_line_exit_2"},
}
# Units that take over ~10 s on 2 shared CPU cores.
LONG_TESTS = {
    "test_bench": {"test_generate_and_train_measurements_run_in_each_precision"},
}


def _is_slow(item) -> bool:
    if STAGE_FIXTURES & set(getattr(item, "fixturenames", ())) or "faults" in item.keywords:
        return True
    name, module = getattr(item, "originalname", item.name), item.module.__name__.rpartition(".")[2]
    return name in SUBPROCESS_TESTS.get(module, ()) or name in LONG_TESTS.get(module, ())


def pytest_collection_modifyitems(config, items):
    """Marks the slow tier (above); skips `cuda`-marked tests (with a reason) where PyTorch sees no
    CUDA GPU."""
    import torch

    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --- fetch: the tiny fetched data set (owned by the fetch stage's issue) --------------------------


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """96 synthetic rows fetched by the real img2dataset from a loopback server: 3 shards of 32 (~3
    broken rows).

    Returns the shards folder; the synthetic source (images, urls.parquet) is its sibling
    `synthetic/`.
    """
    from pipeline.config import FetchConfig
    from stages import fetch

    root = tmp_path_factory.mktemp("tiny_fetch")
    cfg = FetchConfig(count=96, samples_per_shard=32, shards=root / "shards",
                      synthetic_dir=root / "synthetic", processes=1, threads=8, seed=0)
    fetch.run(cfg)
    return cfg.shards


# --- encode: the tiny feature store (owned by the encode stage's issue) ---------------------------
# The one encode recipe every tiny store uses: tests that compare stores bitwise must encode the
# same way (batches never cross shards, so equal batch sizes give equal batches).
TINY_ENCODE = dict(model="vit_tiny_patch16_224", weights="random", seed=0, batch_size=16, workers=2,
                   device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def tiny_store(tiny_shards, tmp_path_factory):
    """`tiny_shards` encoded with a random-init vit_tiny_patch16_224: a zarr store of [n, 197, 192]
    float16."""
    from pipeline.config import EncodeConfig
    from stages import encode

    store = tmp_path_factory.mktemp("store") / "features.zarr"
    encode.run(EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE))
    return store


# --- train: the tiny trained run (owned by the train stage's issue) -------------------------------
# A tiny decoder (2 layers, width 64) on `tiny_store`; tests that train more runs reuse this recipe.
# The optimizer settings are pinned (not TrainConfig's default recipe), so a change of the default
# recipe does not move the numbers these tests were written against; tests/test_early_stop.py and
# the CLI tests run the defaults.
TINY_TRAIN = dict(layers=2, width=64, heads=4, mlp_dim=128, batch_size=16, lr=3e-3, warmup_steps=5,
                  device="cpu", precision="fp32", log_every=2, checkpoint_every=1000,
                  schedule="constant", weight_decay=1e-4,
                  beta2=0.999, patience=0, tie_embeddings=False)


def cli_options(opts: dict) -> list[str]:
    """Keyword options as `pipeline` command-line flags: --name value, or --name / --no-name for
    booleans."""
    out = []
    for k, v in opts.items():
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            out.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(v)]
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_store, tmp_path_factory):
    """A run folder trained 8 epochs on `tiny_store` (config.json, metrics.jsonl, loss.png,
    checkpoints/)."""
    from pipeline.config import TrainConfig
    from stages import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train.run(TrainConfig(store=tiny_store, run=run, epochs=8, **TINY_TRAIN))
    return run


# --- encode in bf16 vs fp32 -----------------------------------------------------------------------
def feature_error(a, b) -> tuple[float, float]:
    """(relative RMS error of features `b` against `a`, lowest per-token cosine similarity), float32
    [N, T, E]."""
    import numpy as np

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rel = float(np.sqrt(((a - b) ** 2).mean() / (a ** 2).mean()))
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return rel, float(cos.min())


# bf16 keeps 8 significant bits (eps 2^-7): the tiny ViT's bf16 features were measured at a relative
# RMS error of 0.6 eps against fp32 on an AVX512-BF16 CPU (per-token cosine >= 0.9999). The bounds
# leave room for other kernels (CUDA's flash attention, oneDNN vs. scalar paths) and still catch any
# real mistake (other weights or preprocessing give errors of order 1).
BF16_FEATURES_CPU = dict(rel_rms=2 * 2.0 ** -7, min_cos=0.999)
BF16_FEATURES_CUDA = dict(rel_rms=4 * 2.0 ** -7, min_cos=0.995)


def store_rows(store, rows):
    """float16 [len(rows), P, E] numpy: the features of store rows `rows` (any order), read the way
    the trainer reads them (pipeline.loader.FeatureSource)."""
    import numpy as np
    import torch

    from pipeline.loader import FeatureSource

    if len(rows) == 0:
        return np.empty((0, store.tokens, store.width), np.float16)
    src = FeatureSource(store, np.asarray(rows, dtype=np.int64), device=torch.device("cpu"),
                        placement="stream", slab_rows=store.shard_capacity)
    return src.read_positions(np.arange(len(src.rows))).numpy()
