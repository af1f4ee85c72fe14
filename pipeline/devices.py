"""Device and precision choice: `auto` picks CUDA when present, and bf16 only where the hardware runs it fast."""

from __future__ import annotations

import functools
from pathlib import Path

from pipeline.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX512-BF16).

    Without it PyTorch's CPU bf16 matmul falls back to a scalar path that is hundreds of times slower
    than fp32 (measured on an AVX2-only EPYC: 0.3 vs 140 GFLOP/s), so `auto` must not choose it there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def resolve_device(name: str):
    """`auto` -> cuda if available else cpu; asking for cuda without a GPU is a user error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible to PyTorch")
    return torch.device(name)


def resolve_precision(name: str, device) -> str:
    """`auto` -> bf16 on CUDA (if supported) or on a CPU with native bf16, else fp32."""
    import torch

    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast_dtype(precision: str):
    """The torch dtype for autocast, or None for fp32 (no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device, precision: str):
    """The mixed-precision context every stage runs its model in: autocast to bf16 / fp16, or nothing (fp32)."""
    import torch

    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def run_precision(name: str, device, trained: str | None) -> str:
    """The precision of a stage that reuses a trained run (eval, caption).

    `auto` = the precision the run trained in, when that is fp32 or what this device picks itself for `auto`;
    otherwise this device's `auto` (a bf16 run evaluated on an AVX2-only CPU runs in fp32 there, where bf16 is
    hundreds of times slower). So on the machine it trained on, eval's validation loss is training's.
    """
    here = resolve_precision(name, device)
    if name != "auto" or trained not in ("fp32", "bf16", "fp16"):
        return here
    return trained if trained in ("fp32", here) else here


def machine_kind(device) -> str:
    """A short name of the kind of machine, for benchmark rows: `cpu-avx512bf16` (native bf16: AVX512-BF16,
    with or without AMX), `cpu-avx2`, ... (the CPU's bf16 capability decides what `auto` picks and how fast
    it runs), or `cuda-<the GPU's name>`."""
    import re

    import torch

    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    for flag, kind in (("avx512_bf16", "avx512bf16"), ("amx_bf16", "avx512bf16"), ("avx512f", "avx512"),
                       ("avx2", "avx2")):
        if flag in flags:
            return f"cpu-{kind}"
    return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"


def precision_rtol(precision: str) -> float:
    """Relative tolerance of a number computed in `precision` against its fp32 value: one bf16 (fp16) epsilon,
    2^-7 (2^-10), for a mean over many terms (its per-term rounding errors partly cancel); fp32: 1e-5."""
    return {"bf16": 2.0 ** -7, "fp16": 2.0 ** -10}.get(precision, 1e-5)
