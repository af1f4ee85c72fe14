"""The CUDA path, end to end on the tiny artefacts: skipped without a GPU (conftest), run by `make gpu-check`.

Never run on a GPU yet (no device was lent to the session that wrote them): the tolerances are stated from the
CPU measurements and bf16's epsilon, see each test.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import BF16_FEATURES_CUDA, TINY_ENCODE, TINY_TRAIN, feature_error, store_rows

from pipeline import checkpoint
from pipeline.config import CaptionConfig, EncodeConfig, EvalConfig, TrainConfig

pytestmark = pytest.mark.cuda


def test_encode_on_cuda_bf16_matches_cpu_fp32(tiny_shards, tiny_store, tmp_path):
    from pipeline.store import FeatureStore
    from stages import encode

    store = tmp_path / "cuda.zarr"
    s = encode.run(EncodeConfig(shards=tiny_shards, store=store, **{**TINY_ENCODE, "device": "cuda",
                                                                    "precision": "bf16", "workers": 8}))
    assert s["device"].startswith("cuda") and s["precision"] == "bf16"
    a, b = FeatureStore.open(tiny_store), FeatureStore.open(store)
    ia, ib = a.index(), b.index()
    assert ia.keys == ib.keys and ia.captions == ib.captions
    rel, cos = feature_error(store_rows(a, ia.rows), store_rows(b, ib.rows))
    assert rel <= BF16_FEATURES_CUDA["rel_rms"] and cos >= BF16_FEATURES_CUDA["min_cos"], (rel, cos)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_on_cuda_and_resume(precision, tiny_store, tmp_path):
    """A few steps on the GPU (features held in GPU memory, then streamed through pinned memory on resume).
    CUDA kernels (atomics in some backward passes) need not be bitwise repeatable, so the resumed run's losses
    match the uninterrupted one's to rel 1e-4 in fp32 and one bf16 epsilon in bf16, and its weights closely."""
    from pipeline.devices import precision_rtol
    from stages import train

    def cfg(run, **kw):
        return TrainConfig(**{**TINY_TRAIN, "device": "cuda", "precision": precision, "log_every": 1,
                              "features": "memory", **kw}, store=tiny_store, run=run, epochs=2)

    a = train.run(cfg(tmp_path / "a", max_steps=6))
    train.run(cfg(tmp_path / "b", max_steps=3))
    b = train.run(cfg(tmp_path / "b", max_steps=6, resume=True, features="stream", stream_buffer_slabs=1))
    assert a["device"].startswith("cuda") and b["steps"] == 6 and b["precision"] == precision
    rel = 1e-4 if precision == "fp32" else precision_rtol("bf16")
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ma] == [e["step"] for e in mb]
    for x, y in zip(ma, mb):
        for k in ("loss", "loss_ar", "loss_par"):
            if x.get(k) is not None:
                assert y[k] == pytest.approx(x[k], rel=rel), (x, y)
    wa, wb = checkpoint.load_weights(tmp_path / "a"), checkpoint.load_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-3, rtol=1e-3, msg=k)


def test_eval_and_caption_on_cuda(tiny_run, tiny_shards, tmp_path):
    import tarfile

    from stages import caption, evaluate
    from test_evaluate import run_copy

    run = run_copy(tiny_run, tmp_path / "run")
    res = evaluate.run(EvalConfig(run=run, limit=4, beam_size=2, batch_size=8, zero_shot_limit=2, grid=4,
                                  shards=tiny_shards, max_new_tokens=8, device="cuda", precision="fp32"))
    assert res["device"].startswith("cuda") and (run / "eval" / "report.md").exists()
    last_val = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["kind"] == "val"][-1]
    # The CPU-trained run's last validation loss, now computed by CUDA's fp32 kernels (TF32 is off by default).
    assert res["val_loss"]["loss_ar"] == pytest.approx(last_val["loss_ar"], rel=1e-4)
    assert res["val_loss"]["loss_par"] == pytest.approx(last_val["loss_par"], rel=1e-4)
    with tarfile.open(sorted(tiny_shards.glob("*.tar"))[0]) as tf:
        jpg = next(m for m in tf if m.name.endswith(".jpg"))
        (tmp_path / "a.jpg").write_bytes(tf.extractfile(jpg).read())
    for precision in ("fp32", "bf16"):
        (cap,) = caption.run(CaptionConfig(images=[tmp_path / "a.jpg"], run=tiny_run, device="cuda",
                                           precision=precision))
        assert isinstance(cap, str)


def test_kv_cache_and_parallel_decoding_on_cuda(tiny_run):
    from pipeline.trained_run import load_run

    cpu = load_run(tiny_run, torch.device("cpu"))
    gpu = load_run(tiny_run, torch.device("cuda"))
    f = torch.randn(4, 197, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_gpu = gpu.decoder.generate(f.cuda(), max_new_tokens=12)
        assert torch.equal(on_gpu, gpu.decoder.generate(f.cuda(), max_new_tokens=12, use_cache=False))
        assert torch.equal(on_gpu.cpu(), cpu.decoder.generate(f, max_new_tokens=12))  # fp32: same argmaxes
        beam = gpu.decoder.generate(f.cuda(), max_new_tokens=12, beam_size=3)
        assert beam.device.type == "cuda" and beam.shape[0] == 4
        # parallel_decode(features, *, refine_steps=0) (one pass) or the older length search
        params = inspect.signature(gpu.decoder.parallel_decode).parameters
        kw = {"max_length": 12} if "max_length" in params else {}
        par = gpu.decoder.parallel_decode(f.cuda(), **kw)
        ref = cpu.decoder.parallel_decode(f, **kw)
    assert par.device.type == "cuda" and par.dtype == torch.long
    assert np.array_equal(par.cpu().numpy(), ref.numpy())
