"""Mixed-precision set-up: one call picks the autocast dtype and the GradScaler.

``precision="auto"`` resolves to
- CUDA with bf16 support (Ampere and newer): bf16, no scaler (bf16 has fp32's exponent range);
- CUDA without bf16 (e.g. V100): fp16 with a GradScaler, what the PASS / TransReID recipes ran;
- CPU and anything else: fp32. CPU bf16 autocast is often slower than fp32 on CPUs without
  native bf16 matrix units (no AVX512-BF16 / AMX), which is most desktop and CI machines.
  ``"bf16"`` can still be requested explicitly on CPU.
fp16 needs CUDA: loss scaling (GradScaler) is what makes fp16 training usable, and on CPU
that pairing is neither supported well nor faster.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpSetup(NamedTuple):
    """``autocast()`` returns a fresh context manager; ``scaler`` is a GradScaler for fp16 only."""

    autocast: Callable[[], AbstractContextManager[object]]
    scaler: torch.amp.GradScaler | None


def resolve_precision(device: str | torch.device, precision: str) -> str:
    """The concrete precision (``"bf16"``, ``"fp16"`` or ``"fp32"``) for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    is_cuda = device_type == "cuda"
    if is_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"precision set-up: device {device!r} requested but CUDA is not available")
    if precision == "auto":
        if not is_cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not is_cuda:
        raise ValueError(
            f"precision 'fp16' needs a CUDA device (it trains with GradScaler loss scaling), got "
            f"device {device!r}; use 'bf16' or 'fp32' on CPU, or 'auto'"
        )
    if precision == "bf16" and is_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("precision 'bf16' requested but this GPU does not support bf16; use 'fp16' or 'auto'")
    return precision


def autocast_for(device: str | torch.device, precision: str = "auto") -> AmpSetup:
    """Autocast factory and GradScaler (or ``None``) for ``precision`` on ``device``.

    Usage: ``amp = autocast_for(device, cfg.precision)``; ``with amp.autocast(): loss = ...``;
    then ``amp.scaler.scale(loss).backward()`` when ``amp.scaler`` is not ``None``.
    fp32 returns a *disabled* autocast, so it also switches off an enclosing autocast region.
    """
    resolved = resolve_precision(device, precision)
    device_type = torch.device(device).type
    if resolved == "fp32":
        return AmpSetup(functools.partial(torch.autocast, device_type=device_type, enabled=False), None)
    autocast = functools.partial(torch.autocast, device_type=device_type, dtype=_DTYPES[resolved])
    scaler = torch.amp.GradScaler("cuda") if resolved == "fp16" else None
    return AmpSetup(autocast, scaler)
