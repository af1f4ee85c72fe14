"""Encode stage: features equal timm's own, kill -9 + resume is bitwise, provenance guards, torchrun, status."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ENCODE, store_rows

from pipeline.config import EncodeConfig
from pipeline.errors import UserError
from pipeline.store import FeatureStore, StoreLock
from stages import encode

ARRAYS = ("features", "valid", "keys", "captions", "meta", "shard_done")


def _cli_args(shards: Path, store: Path, **over) -> list[str]:
    opts = {**TINY_ENCODE, **over}
    args = ["encode", "--shards", str(shards), "--store", str(store)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def _assert_same_store(a: Path, b: Path) -> None:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert ga.attrs["shards"] == gb.attrs["shards"]
    for name in ARRAYS:
        x, y = np.asarray(ga[name][:]), np.asarray(gb[name][:])
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert np.array_equal(x, y), f"{name} differs"  # bitwise for float16 (no NaNs in features)
    ia = FeatureStore.open(a).index()
    assert len(set(ia.keys)) == len(ia.keys)  # no duplicate keys


def _subset(shards: Path, dst: Path, n: int = 1) -> Path:
    """A shards folder with the first `n` finished shards of `shards` (symlinks)."""
    dst.mkdir()
    for name, tar, _ in encode.complete_shards(shards)[:n]:
        (dst / name).symlink_to(tar)
        (dst / f"{tar.stem}_stats.json").symlink_to(tar.with_name(f"{tar.stem}_stats.json"))
    return dst


def test_features_equal_timm_forward_features(tiny_shards, tiny_store):
    import timm
    import torch
    import webdataset as wds
    from PIL import Image

    st = FeatureStore.open(tiny_store)
    idx = st.index()
    assert st.is_random_init and st.encoder["weights"]["seed"] == 0 and (st.tokens, st.width) == (197, 192)
    fetched = sum(s["successes"] for *_, s in encode.complete_shards(tiny_shards))
    assert len(idx) == fetched and len(set(idx.keys)) == fetched

    # timm's own path, independent of pipeline.encoder: seeded model, its eval transform, forward_features
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    tar = encode.complete_shards(tiny_shards)[-1][1]
    samples = list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))[:6]
    x = torch.stack([tf(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
    with torch.inference_mode():
        ref = model.forward_features(x).numpy()  # [6, 197, 192] fp32
    pos = {k: i for i, k in enumerate(idx.keys)}
    rows = idx.rows[[pos[s["__key__"]] for s in samples]]
    got = store_rows(st, rows).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2**-10, atol=1e-4)  # fp16 rounding (+ batch-size fp32 noise)
    assert [idx.captions[pos[s["__key__"]]] for s in samples] == [s["txt"].decode() for s in samples]
    assert all(idx.meta[pos[s["__key__"]]] == s["json"].decode() for s in samples)


def test_kill9_and_resume_is_bitwise(tiny_shards, tiny_store, tmp_path):
    store = tmp_path / "resumed.zarr"
    # SIGKILL right after the 5th forward pass (16-image batches, 32-row shards): shard 0 is done, shard 1's
    # write may be half way (its writer thread runs beside the model), shard 2 is half encoded in memory.
    p = subprocess.run([sys.executable, "-m", "pipeline", *_cli_args(tiny_shards, store)],
                       env=_env(PIPELINE_TEST_KILL="batch:5"), capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert 1 <= FeatureStore.open(store).shard_done().sum() < 3
    assert StoreLock(store).path.exists()  # the killed writer's lock is stale, not a blocker
    summary = encode.run(EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE))
    assert 0 < summary["shards_encoded"] < summary["shards_total"]
    _assert_same_store(store, tiny_store)
    # a rerun over a finished store does nothing
    assert encode.run(EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE))["images"] == 0


def test_other_encoder_refused_lock_and_overwrite(tiny_shards, tiny_store, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, store)
    for over, what in ((dict(seed=1), "weights random-init \\(seed 0\\) vs random-init \\(seed 1\\)"),
                       (dict(model="vit_small_patch16_224"), "model")):
        with pytest.raises(UserError, match=f"another encoder \\({what}"):
            encode.run(EncodeConfig(shards=tiny_shards, store=store, **{**TINY_ENCODE, **over}))
    with StoreLock(store):  # a second encoder at the same time refuses instead of writing
        with pytest.raises(UserError, match="another encoder \\(pid"):
            encode.run(EncodeConfig(shards=tiny_shards, store=store, **TINY_ENCODE))
    one = _subset(tiny_shards, tmp_path / "one")
    encode.run(EncodeConfig(shards=one, store=store, **{**TINY_ENCODE, "seed": 1, "overwrite": True}))
    st = FeatureStore.open(store)
    assert st.encoder["weights"]["seed"] == 1 and len(st.shards) == 1


def _to_original_vit_npz(model, path: Path) -> None:
    """Write a timm ViT's weights in the original google-research/vision_transformer .npz layout."""
    t = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    e = model.embed_dim
    h = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
         "embedding/bias": t["patch_embed.proj.bias"], "cls": t["cls_token"],
         "Transformer/posembed_input/pos_embedding": t["pos_embed"],
         "Transformer/encoder_norm/scale": t["norm.weight"], "Transformer/encoder_norm/bias": t["norm.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = t[b + norm + ".weight"], t[b + norm + ".bias"]
        qkv_w, qkv_b = t[b + "attn.qkv.weight"].reshape(3, e, e), t[b + "attn.qkv.bias"].reshape(3, h, e // h)
        for j, n in enumerate(("query", "key", "value")):
            w[f"{p}MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j].T.reshape(e, h, e // h)
            w[f"{p}MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j]
        out = t[b + "attn.proj.weight"].reshape(e, h, e // h)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = out.transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = t[b + "attn.proj.bias"]
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = t[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = t[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_local_weights_file_air_gapped(tiny_shards, tiny_store, tmp_path, monkeypatch):
    """The same tensors from a safetensors / .pth file give the very same features, with the hub off."""
    import torch
    from safetensors.torch import save_file

    from pipeline.encoder import build_encoder, build_encoder_from_provenance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = FeatureStore.open(tiny_store)
    enc = build_encoder_from_provenance(ref.encoder)  # rebuilds the seeded random init, fingerprint-checked
    save_file(enc.model.state_dict(), tmp_path / "w.safetensors")
    torch.save(enc.model.state_dict(), tmp_path / "w.pth")
    pth = build_encoder("vit_tiny_patch16_224", str(tmp_path / "w.pth"))
    assert pth.provenance["weights"]["kind"] == "file"
    assert pth.provenance["weights"]["state_sha256"] == ref.encoder["weights"]["state_sha256"]
    _to_original_vit_npz(enc.model, tmp_path / "w.npz")  # the original JAX checkpoint format
    npz = build_encoder("vit_tiny_patch16_224", str(tmp_path / "w.npz"))
    assert npz.provenance["weights"]["state_sha256"] == ref.encoder["weights"]["state_sha256"]

    one = _subset(tiny_shards, tmp_path / "one")
    store = tmp_path / "file.zarr"
    cfg = {**TINY_ENCODE, "weights": str(tmp_path / "w.safetensors")}
    encode.run(EncodeConfig(shards=one, store=store, **cfg))
    st = FeatureStore.open(store)
    assert st.encoder["weights"]["kind"] == "file" and not st.is_random_init
    n = len(st.index())
    np.testing.assert_array_equal(st.read(0, n), ref.read(0, n))
    # same tensors, other source: the store accepts the random-init rebuild as the same encoder
    encode.run(EncodeConfig(shards=one, store=store, **TINY_ENCODE))
    with pytest.raises(UserError, match="no such file"):
        build_encoder("vit_tiny_patch16_224", str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="does not fit"):
        build_encoder("vit_small_patch16_224", str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="--weights hub"):
        build_encoder("vit_tiny_patch16_224", "hub")


def test_status_matches_store_and_incremental_rerun(tiny_shards, tiny_store, tmp_path):
    from pipeline.status import store_summary

    s = store_summary(tiny_store, tiny_shards)
    st = FeatureStore.open(tiny_store)
    fetched = {n: stats["successes"] for n, _, stats in encode.complete_shards(tiny_shards)}
    assert s["encoded"] == len(st.index()) == s["fetched"] == sum(fetched.values()) and s["coverage"] == 1.0
    assert {r["shard"]: (r["fetched"], r["encoded"]) for r in s["shards"]} == \
        {n: (fetched[n], c) for n, c in st.shard_counts().items()}
    assert s["random_init"] and s["weights_label"] == "random-init (seed 0)" and s["size_bytes"] == st.size_bytes()
    # a partly encoded store, and `pipeline status` never imports torch
    part = tmp_path / "part.zarr"
    encode.run(EncodeConfig(shards=_subset(tiny_shards, tmp_path / "one"), store=part, **TINY_ENCODE))
    code = ("import sys, json; from pathlib import Path; from pipeline import status; "
            f"s = status.store_summary(Path({str(part)!r}), Path({str(tiny_shards)!r})); "
            "print(json.dumps([s['encoded_of_fetched'], s['fetched'], 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    first = encode.complete_shards(tiny_shards)[0][2]["successes"]
    assert out.stdout.strip() == f"[{first}, {sum(fetched.values())}, false]"
    # after a larger fetch a rerun encodes only the new shards, and the store equals a one-go build
    assert encode.run(EncodeConfig(shards=tiny_shards, store=part, **TINY_ENCODE))["shards_encoded"] == len(fetched) - 1
    _assert_same_store(part, tiny_store)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(tiny_shards, tiny_store, tmp_path):
    store = tmp_path / "ddp.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--module", "pipeline", *_cli_args(tiny_shards, store)]
    p = subprocess.run(cmd, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_store(store, tiny_store)



def test_bf16_features_match_fp32_within_bf16_tolerance(tiny_shards, tiny_store):
    """The bf16 encoder (what `auto` picks on an AVX512-BF16 CPU) against the fp32 store, on 4 images: cheap even
    where bf16 is ~300x slower (AVX2)."""
    import torch
    import webdataset as wds
    from conftest import BF16_FEATURES_CPU, feature_error
    from PIL import Image

    from pipeline.encoder import build_random

    st = FeatureStore.open(tiny_store)
    idx = st.index()
    tar = encode.complete_shards(tiny_shards)[0][1]
    samples = list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))[:4]
    images = [Image.open(io.BytesIO(s["jpg"])) for s in samples]
    bf16 = build_random("vit_tiny_patch16_224", 0, torch.device("cpu"), "bf16").encode_images(images)
    pos = {k: i for i, k in enumerate(idx.keys)}
    fp32 = store_rows(st, idx.rows[[pos[s["__key__"]] for s in samples]])  # the fp32 store's rows
    rel, cos = feature_error(fp32, bf16)
    assert 0 < rel <= BF16_FEATURES_CPU["rel_rms"] and cos >= BF16_FEATURES_CPU["min_cos"], (rel, cos)
