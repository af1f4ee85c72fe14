"""bf16 weights with fp32 masters (pipeline/precision.py) and the heap allocator setting (pipeline/memory.py).

Tiny decoder (2 x 64): bf16 runs on every CPU kind, but ~300x slower where it is not native (AVX2).
"""

from __future__ import annotations

import resource

import pytest
import torch

from pipeline import checkpoint
from pipeline.config import DecoderConfig, TrainConfig
from pipeline.devices import precision_rtol
from pipeline.dist import Dist
from pipeline.loader import Batch
from pipeline.memory import give_back, tune_allocator
from pipeline.model import CaptionDecoder
from pipeline.training import TrainState, train_step

V, P, E, LP = 96, 5, 48, 8


def _state(monkeypatch, weights: str, seed: int = 0) -> TrainState:
    monkeypatch.setenv("PIPELINE_BF16_WEIGHTS", "1" if weights == "master" else "0")
    cfg = DecoderConfig(layers=2, width=64, heads=2, mlp_dim=128, vocab_size=V, max_len=12, encoder_width=E,
                        mask_id=V - 1, bos_id=V - 2, eos_id=V - 2, parallel_len=LP, tie_embeddings=True,
                        image_pos_emb=True, image_tokens=P)
    torch.manual_seed(seed)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=2, batch_size=8)
    return TrainState.create(CaptionDecoder(cfg), tcfg, 100, "bf16", Dist(), torch.device("cpu"))


def _batches(n: int, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, 11, (8,), generator=g)
        mask = torch.arange(10)[None] < lengths[:, None]  # [8, 10]
        targets = torch.randint(0, V - 2, (8, 10), generator=g).masked_fill(~mask, V - 2)
        par = torch.rand(8, generator=g) < 0.75
        feats = torch.randn(8, P, E, generator=g).half().float()  # the store's fp16 values, widened
        out.append(Batch.of(feats, targets, mask, par, LP))
    return out


def test_master_weights_stay_fp32_and_the_step_runs_a_bf16_copy(monkeypatch):
    state = _state(monkeypatch, "master")
    assert state.bf16 is not None and state.net is state.bf16.module
    for b in _batches(2):
        train_step(state, b)
    assert {p.dtype for p in state.decoder.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in state.decoder.parameters() if p.grad is not None} == {torch.float32}
    assert {p.dtype for g in state.optimizer.param_groups for p in g["params"]} == {torch.float32}
    assert {p.dtype for p in state.net.parameters()} == {torch.bfloat16}
    assert state.net.head.weight is state.net.tok_emb.weight  # still tied in the copy
    state.bf16.pull()
    for m, w in zip(state.decoder.parameters(), state.net.parameters()):
        assert torch.equal(w, m.to(torch.bfloat16))  # the copy is the master, rounded


def test_bf16_weights_follow_autocast_to_bf16_rounding(monkeypatch):
    """Same init, same batches: each step's loss agrees with autocast's to bf16 rounding (the residual stream
    is bf16 here and fp32 under autocast, so they are not equal)."""
    batches = _batches(2) * 3  # seen again: the loss falls
    runs = {}
    for weights in ("master", "autocast"):
        state = _state(monkeypatch, weights)
        assert (state.bf16 is None) == (weights == "autocast")
        runs[weights] = [float(train_step(state, b).sums.loss) for b in batches]
    loss_m, loss_a = runs["master"], runs["autocast"]
    assert loss_m[0] > loss_m[-1] + 0.1  # it learns: the comparison is of moving curves
    for a, m in zip(loss_a, loss_m):
        assert m == pytest.approx(a, rel=2 * precision_rtol("bf16"))


def test_resume_is_exact_and_checkpoints_keep_fp32_under_the_same_keys(monkeypatch, tmp_path):
    batches = _batches(5)
    state = _state(monkeypatch, "master")
    for b in batches[:3]:
        train_step(state, b)
    checkpoint.save(tmp_path, model=state.decoder, optimizer=state.optimizer, scheduler=state.scheduler,
                    step=3, epoch=0, batch=3)
    saved = checkpoint.load_weights(tmp_path)
    assert set(saved) == set(_state(monkeypatch, "autocast").decoder.state_dict())  # an autocast run's keys
    assert {v.dtype for v in saved.values()} == {torch.float32}
    want = [float(train_step(state, b).sums.loss) for b in batches[3:]]
    resumed = _state(monkeypatch, "master", seed=7)  # other init: everything comes from the checkpoint
    checkpoint.load(tmp_path, model=resumed.decoder, optimizer=resumed.optimizer, scheduler=resumed.scheduler)
    got = [float(train_step(resumed, b).sums.loss) for b in batches[3:]]
    assert got == want
    for a, b in zip(state.decoder.parameters(), resumed.decoder.parameters()):
        assert torch.equal(a, b)


def test_fp32_and_multi_process_runs_keep_their_path(monkeypatch):
    monkeypatch.setenv("PIPELINE_BF16_WEIGHTS", "1")
    from pipeline.precision import bf16_weights

    dec = torch.nn.Linear(4, 4)
    assert bf16_weights(dec, "fp32", 1) is None
    assert bf16_weights(dec, "fp16", 1) is None
    assert bf16_weights(dec, "bf16", 2) is None  # DDP keeps autocast
    assert bf16_weights(dec, "bf16", 1) is not None


def test_heap_allocator_keeps_freed_blocks_out_of_the_kernel():
    """After tune_allocator, freed 64 MiB blocks (over glibc's largest mmap threshold) are reused by later
    allocations of that size once the heap has grown to fit them (posix_memalign's padding: a few rounds):
    touching them again costs no page faults. Untuned, every round faults in all 16,384 pages."""
    assert tune_allocator() is True  # glibc accepted every mallopt setting (the project's CPUs run glibc)
    n = 16 << 20  # float32 elements: 64 MiB
    for _ in range(12):  # the heap's growth to a steady state
        torch.empty(n).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(n).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 0.05 * 3 * (64 << 20) / 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_give_back_returns_one_off_blocks_to_the_os():
    """The kept heap holds what a one-off allocation (validation, a checkpoint) freed until
    give_back, which returns it: RSS falls by about the block's size."""
    assert tune_allocator() is True
    block = torch.empty(64 << 20).fill_(1.0)  # 256 MiB, from the heap (no per-block mmap)
    del block
    held = _rss_bytes()
    assert give_back() is True
    assert held - _rss_bytes() > 128 << 20
