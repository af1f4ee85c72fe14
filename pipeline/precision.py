"""bf16 training with fp32 master weights: the forward and backward run on a bf16 copy of the decoder.

Under autocast every matmul casts its fp32 weight to bf16 (once per forward: autocast caches it), casts its
fp32 input activation to bf16 (every use: the residual stream stays fp32), and the backward casts all those
gradients back; on a fast-bf16 machine those casts were a fifth of the step's CPU time. Here the decoder the
trainer builds stays fp32 (the master: what the optimizer updates, checkpoints save under the same keys, and
validation and generation read), and the step runs a working copy whose parameters are bf16, so nothing
inside the forward or backward changes dtype except the loss, which promotes logits to fp32 itself.

Per step, each parameter is cast twice: master -> working copy before the forward (`pull`), and its bf16
gradient -> an fp32 gradient on the master after the backward (`push_grads`). Clipping, the non-finite
check and the fused AdamW update all run on the fp32 master, as under autocast. Pulling before every
forward (not after every update) keeps the copy right after anything that loads the master (resume).

The copy is bf16 throughout, residual stream and norms included; the loss curve follows autocast's to bf16
rounding (tests/test_precision.py). Opt-in (`PIPELINE_BF16_WEIGHTS=1`): on the AVX512-BF16 + AMX CPU it
removes 126 of autocast's 260 casts per full-size step, but once the heap keeps freed blocks
(pipeline/memory.py) the step takes the same time as autocast's (1.61 vs 1.60 s, docs/BENCHMARKS.md), and
its bf16 residual stream drifts further from fp32; a GPU, where casts weigh more, is where to measure it
next. One-process bf16 training only; fp16 (loss scaling) and DDP keep autocast.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn


class BF16Weights:
    """A bf16 working copy of the fp32 `master` module, parameters paired in `parameters()` order (a tied
    matrix is one parameter in both, and stays tied in the copy)."""

    def __init__(self, master: nn.Module):
        self.master = master
        self.module = copy.deepcopy(master).to(torch.bfloat16)
        self.master_params = list(master.parameters())
        self.params = list(self.module.parameters())
        if [p.shape for p in self.params] != [p.shape for p in self.master_params]:
            raise ValueError("the bf16 copy's parameters do not pair with the master's")
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def pull(self) -> None:
        """Master -> working copy: one fp32 -> bf16 cast per parameter."""
        torch._foreach_copy_(self.params, self.master_params)

    @torch.no_grad()
    def push_grads(self) -> None:
        """The copy's bf16 gradients -> fp32 gradients on the master (replacing them), and clears the copy's."""
        for m, p in zip(self.master_params, self.params):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None


def bf16_weights(decoder: nn.Module, precision: str, world: int) -> BF16Weights | None:
    """The bf16 working copy for a one-process bf16 run, else None (autocast as before)."""
    if precision != "bf16" or world > 1 or os.environ.get("PIPELINE_BF16_WEIGHTS", "0") != "1":
        return None
    return BF16Weights(decoder)
