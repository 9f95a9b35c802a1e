"""Mixed-precision set-up: one call picks the autocast dtype and the GradScaler.

``precision="auto"`` resolves to
- CUDA with bf16 support (Ampere and newer): bf16, no scaler (bf16 has fp32's exponent range);
- CUDA without bf16 (e.g. V100): fp16 with a GradScaler;
- CPU and anything else: fp32. CPU bf16 autocast is often slower than fp32 on CPUs without
  native bf16 matrix units (no AVX512-BF16 / AMX), which is most desktop and CI machines.
  ``"bf16"`` can still be requested explicitly on CPU.
fp16 needs CUDA: loss scaling (GradScaler) is what makes fp16 training usable, and on CPU
that pairing is neither supported well nor faster.

``auto`` is for demos and exploration. The recipes that reproduce a published row pin what the
published code ran: fp16 autocast + GradScaler for training (TransReID-family fine-tuning, PASS
pre-training) or fp32 (Cluster-Contrast, BPBReID, DPEFormer), and fp32 evaluation everywhere. A run
trains in ``train.precision`` and extracts every evaluation feature in ``eval.precision``
(:func:`run_precision`).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from passreid.config.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LABELS = {"fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast", "fp32": "fp32 (no autocast)"}


class AmpSetup(NamedTuple):
    """``autocast()`` returns a fresh context manager; ``scaler`` is a GradScaler for fp16 only."""

    autocast: Callable[[], AbstractContextManager[object]]
    scaler: torch.amp.GradScaler | None


class RunPrecision(NamedTuple):
    """What a run trains and evaluates in, as requested (``train.precision`` / ``eval.precision``) and as
    resolved for its device (``bf16``, ``fp16`` or ``fp32``)."""

    train_requested: str
    train: str
    eval_requested: str
    eval: str

    def describe(self) -> str:
        """E.g. ``train fp16 autocast + GradScaler, eval fp32 (no autocast)``, with ``(auto)`` where resolved."""
        return (f"train {describe_precision(self.train_requested, self.train)}, "
                f"eval {describe_precision(self.eval_requested, self.eval)}")


def describe_precision(requested: str, resolved: str) -> str:
    """``fp16 autocast + GradScaler``, ``bf16 autocast (from auto)``, ``fp32 (no autocast)``, ..."""
    return _LABELS[resolved] + (f" (from {requested})" if requested != resolved else "")


def resolve_precision(device: str | torch.device, precision: str, key: str = "precision") -> str:
    """The concrete precision (``"bf16"``, ``"fp16"`` or ``"fp32"``) for ``precision`` on ``device``.

    A value that cannot run on ``device`` is a :class:`ConfigError` naming ``key`` (the config key it came
    from, e.g. ``train.precision``).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"config key '{key}': must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    is_cuda = device_type == "cuda"
    if is_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"precision set-up: device {device!r} requested but CUDA is not available")
    if precision == "auto":
        if not is_cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not is_cuda:
        raise ConfigError(
            f"config key '{key}': 'fp16' needs a CUDA device (it trains with GradScaler loss scaling), got "
            f"device {device!r}; set {key}=fp32 (or bf16) to run on CPU, or auto"
        )
    if precision == "bf16" and is_cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"config key '{key}': 'bf16' requested but this GPU does not support bf16; "
                          f"use fp16 or auto")
    return precision


def run_precision(device: str | torch.device, train_precision: str, eval_precision: str,
                  eval_key: str = "eval.precision") -> RunPrecision:
    """Resolve a run's training and evaluation precision for ``device`` (errors name the config key; the
    evaluation one is ``eval_key``)."""
    return RunPrecision(train_precision, resolve_precision(device, train_precision, "train.precision"),
                        eval_precision, resolve_precision(device, eval_precision, eval_key))


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
