"""Device placement: each stage resolves its device once and hands that very object to its model and to the
loader (or encoder) that feeds it, so a GPU run never feeds CPU batches to a CUDA model. Plus the precision
rules: what `auto` picks, what eval and caption inherit from a run, and the machine kind of benchmark rows.

On a CPU-only machine "cpu" and "cuda" cannot both be made, so the test makes the stage's device a distinct
`torch.device` object (equal to, but not the same object as, any other `torch.device("cpu")`) and checks
identity: a stage that builds a second device of its own (the eval bug: its FeatureSource was built on
`torch.device("cpu")` whatever the decoder's device) fails here, and would have fed a CUDA decoder CPU batches.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import devices


class _Stop(Exception):
    """Raised by a spy once it has seen what the test needs: the rest of the stage is not run."""


@pytest.fixture
def one_device(monkeypatch):
    """The stage's device: a fresh object that `resolve_device` returns, and the devices the stage used."""
    dev = torch.device("cpu")
    seen: dict[str, list] = {"model": [], "source": [], "encoder": []}
    monkeypatch.setattr(devices, "resolve_device", lambda name: dev)

    from pipeline.model import CaptionDecoder

    to = CaptionDecoder.to

    def spy_to(self, *args, **kw):
        seen["model"] += [a for a in (*args, *kw.values()) if isinstance(a, torch.device)]
        return to(self, *args, **kw)

    monkeypatch.setattr(CaptionDecoder, "to", spy_to)
    return dev, seen


def _spy_loader(monkeypatch, seen, stop: bool = True):
    """Record the device of every FeatureSource the stage builds; stop the stage at its first epoch."""
    from pipeline import loader

    init = loader.FeatureSource.__init__

    def spy_init(self, *args, device, **kw):
        seen["source"].append(device)
        init(self, *args, device=device, **kw)

    monkeypatch.setattr(loader.FeatureSource, "__init__", spy_init)
    if stop:
        def stop_epoch(self, *a, **k):
            raise _Stop

        monkeypatch.setattr(loader.Loader, "epoch", stop_epoch)


def _all_are(dev, found: list) -> bool:
    return bool(found) and all(d is dev for d in found)


def test_eval_hands_its_loader_and_its_decoder_one_device(one_device, monkeypatch, tiny_run):
    from pipeline.config import EvalConfig
    from stages import evaluate

    dev, seen = one_device
    monkeypatch.setattr(evaluate, "resolve_device", lambda name: dev)  # the stage imports it by name
    _spy_loader(monkeypatch, seen)
    with pytest.raises(_Stop):  # stopped at the validation loss's first batch
        evaluate.run(EvalConfig(run=tiny_run, device="cuda", precision="fp32"))
    assert _all_are(dev, seen["model"]), seen
    assert _all_are(dev, seen["source"]), f"eval's feature source is not on the decoder's device: {seen}"


def test_train_hands_its_loader_and_its_decoder_one_device(one_device, monkeypatch, tiny_store, tmp_path):
    from conftest import TINY_TRAIN

    from pipeline.config import TrainConfig
    from stages import train

    dev, seen = one_device
    monkeypatch.setattr(train, "resolve_device", lambda name: dev)  # the stage imports it by name
    _spy_loader(monkeypatch, seen)
    with pytest.raises(_Stop):
        train.run(TrainConfig(**{**TINY_TRAIN, "device": "cuda"}, store=tiny_store, run=tmp_path / "run"))
    assert _all_are(dev, seen["model"]) and _all_are(dev, seen["source"]), seen


def test_caption_hands_its_encoder_and_its_decoder_one_device(one_device, monkeypatch, tiny_run, tiny_shards,
                                                              tmp_path):
    import tarfile

    from pipeline import encoder
    from pipeline.config import CaptionConfig
    from stages import caption

    dev, seen = one_device
    build = encoder.build_encoder_from_provenance

    def spy_build(prov, device=None, **kw):
        seen["encoder"].append(device)
        return build(prov, device=device, **kw)

    monkeypatch.setattr(encoder, "build_encoder_from_provenance", spy_build)
    with tarfile.open(sorted(tiny_shards.glob("*.tar"))[0]) as tf:
        jpg = next(m for m in tf if m.name.endswith(".jpg"))
        (tmp_path / "a.jpg").write_bytes(tf.extractfile(jpg).read())
    caption.run(CaptionConfig(images=[tmp_path / "a.jpg"], run=tiny_run, device="cuda", precision="fp32"))
    assert _all_are(dev, seen["model"]) and _all_are(dev, seen["encoder"]), seen


def test_encode_builds_its_encoder_on_the_resolved_device(one_device, monkeypatch, tiny_shards, tmp_path):
    from conftest import TINY_ENCODE

    from pipeline import encoder
    from pipeline.config import EncodeConfig
    from stages import encode

    dev, seen = one_device

    def spy_build(model, weights, seed, device, precision):
        seen["encoder"].append(device)
        raise _Stop

    monkeypatch.setattr(encoder, "build_encoder", spy_build)
    with pytest.raises(_Stop):
        encode.run(EncodeConfig(shards=tiny_shards, store=tmp_path / "s.zarr", **{**TINY_ENCODE, "device": "cuda"}))
    assert _all_are(dev, seen["encoder"]), seen


def test_cuda_pinning_is_a_copy_and_cpu_batches_are_not_pinned(tiny_store):
    """The loader pins only for CUDA; pinning copies (a streamed batch views a buffer that is refilled)."""
    import numpy as np

    from pipeline import loader
    from pipeline.store import FeatureStore
    from pipeline.tokenizer import load_tokenizer

    st = FeatureStore.open(tiny_store)
    idx = st.index()
    src = loader.FeatureSource(st, idx.rows, device=torch.device("cpu"), placement="stream",
                               slab_rows=32)
    ld = loader.Loader(src, loader.CaptionTokens(load_tokenizer("gpt2"), idx.captions, 16), np.arange(len(idx)), 8)
    b = next(iter(ld.epoch(0)))
    assert not b.features.is_pinned() and b.features.dtype == torch.float32
    if torch.cuda.is_available():
        t = torch.zeros(3)
        p = loader._pinned(t)
        assert p.is_pinned() and p.data_ptr() != t.data_ptr()


def test_precision_rules():
    cpu = torch.device("cpu")
    native = "bf16" if devices.cpu_has_fast_bf16() else "fp32"
    assert devices.resolve_precision("auto", cpu) == native
    # eval / caption: the run's precision where this machine runs it fast, else this machine's own choice
    assert devices.run_precision("auto", cpu, "fp32") == "fp32"
    assert devices.run_precision("auto", cpu, "bf16") == native
    assert devices.run_precision("auto", cpu, None) == native
    assert devices.run_precision("bf16", cpu, "fp32") == "bf16"  # an explicit choice wins
    with pytest.raises(devices.UserError, match="unknown precision"):
        devices.run_precision("fp8", cpu, "fp32")
    assert devices.precision_rtol("bf16") == 2.0 ** -7 == torch.finfo(torch.bfloat16).eps
    kind = devices.machine_kind(cpu)
    assert kind.startswith("cpu-") and (kind == "cpu-avx512bf16") == devices.cpu_has_fast_bf16()


def test_eval_records_the_precision_it_inherited(tiny_run):
    import json

    from pipeline import trained_run as run

    rec = json.loads((tiny_run / "config.json").read_text())
    assert run.trained_precision(tiny_run, rec) == "fp32"  # the tiny run trains in fp32 (TINY_TRAIN)
