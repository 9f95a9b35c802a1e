"""Learning-rate / weight-decay / momentum schedules.

Every stage trains from precomputed per-iteration arrays (:class:`passreid.engine.trainer.Trainer` reads
``schedule[iteration]``, so resuming needs nothing but the iteration counter, and the run folder keeps them in
``schedules.npz``). They are built from:

- :func:`cosine_schedule`: per-iteration values (dinov2 / DINO / PASS pre-training, PASS-reID: PASS/utils.py
  ``cosine_scheduler``);
- the per-epoch rules of the published recipes that step once per epoch, repeated over each epoch's
  iterations: :func:`warmup_cosine_lr` (timm ``CosineLRScheduler`` with ``cycle_limit=1``, PASS / TransReID
  fine-tuning, TransReID: solver/scheduler_factory.py), :func:`warmup_multistep_lr` (torchreid, BPBReID) and
  :func:`warmup_step_lr` (StepLR, Cluster-Contrast).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from passreid.atomic_files import atomic_write


def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a half cosine from ``base`` to ``final``.

    Warm-up is ``np.linspace(start_warmup, base, warmup_iters)`` (endpoint included, so the
    first value is ``start_warmup`` and the last warm-up value is ``base``). The remaining
    ``n = total_iters - warmup_iters`` values are ``final + 0.5 (base - final)(1 + cos(pi i / n))``
    for ``i = 0..n-1``: they start at ``base`` and approach, without reaching, ``final``.
    Returns an array of length ``total_iters``.
    """
    if total_iters <= 0:
        raise ValueError(f"cosine_schedule: total_iters must be positive, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(
            f"cosine_schedule: warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}"
        )
    warmup = np.linspace(start_warmup, base, warmup_iters)
    steps = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


def warmup_cosine_lr(
    epoch: int,
    base_lr: float,
    total_epochs: int,
    warmup_epochs: int = 0,
    warmup_lr_init: float = 0.0,
    lr_min: float = 0.0,
) -> float:
    """Learning rate at ``epoch`` of timm's ``CosineLRScheduler`` (one cycle, ``warmup_prefix=False``).

    - ``t < warmup_epochs``: ``warmup_lr_init + t (base_lr - warmup_lr_init) / warmup_epochs``;
    - ``warmup_epochs <= t < total_epochs``: ``lr_min + 0.5 (base_lr - lr_min)(1 + cos(pi t / total_epochs))``,
      with ``t`` *not* shifted by the warm-up, so the cosine phase starts below ``base_lr``;
    - ``t >= total_epochs``: ``lr_min``.
    PASS fine-tuning: ``warmup_lr_init = 0.01 BASE_LR``, ``lr_min = 0.002 BASE_LR``, where
    ``base_lr`` may be a group's own rate (biases at 2x) while ``lr_min`` stays from BASE_LR.
    """
    if total_epochs <= 0:
        raise ValueError(f"warmup_cosine_lr: total_epochs must be positive, got {total_epochs}")
    if warmup_epochs < 0 or epoch < 0:
        raise ValueError(f"warmup_cosine_lr: epoch and warmup_epochs must be >= 0, got {epoch}, {warmup_epochs}")
    if epoch < warmup_epochs:
        return warmup_lr_init + epoch * (base_lr - warmup_lr_init) / warmup_epochs
    if epoch >= total_epochs:
        return lr_min
    return lr_min + 0.5 * (base_lr - lr_min) * (1 + math.cos(math.pi * epoch / total_epochs))


def apply_schedule(
    optimizer: torch.optim.Optimizer,
    lr: float | None = None,
    weight_decay: float | None = None,
) -> None:
    """Write this iteration's scheduled values into the param groups, dinov2-style.

    Each group gets ``lr * group.get("lr_multiplier", 1)`` and
    ``weight_decay * group.get("wd_multiplier", 1)`` (``wd_multiplier=0`` for biases/norms,
    layer-wise decay through ``lr_multiplier``). ``None`` leaves that hyper-parameter alone.
    """
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = float(lr) * group.get("lr_multiplier", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay) * group.get("wd_multiplier", 1.0)


def warmup_multistep_lr(
    epoch: int,
    base_lr: float,
    milestones: list[int] | tuple[int, ...],
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    warmup_factor: float = 0.01,
) -> float:
    """Learning rate at ``epoch`` of torchreid's ``WarmupMultiStepLR`` (linear warm-up; bpbreid: torchreid/optim/lr_scheduler.py).

    ``base_lr * f(epoch) * gamma ** (number of milestones <= epoch)`` with
    ``f = warmup_factor + (1 - warmup_factor) * epoch / warmup_epochs`` during the warm-up, else 1.
    BPBReID: warm-up 10 epochs from 0.01x, x0.1 at epochs 40 and 70.
    """
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"warmup_multistep_lr: epoch and warmup_epochs must be >= 0, got {epoch}, {warmup_epochs}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"warmup_multistep_lr: milestones must be increasing, got {list(milestones)}")
    factor = 1.0
    if epoch < warmup_epochs:
        factor = warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs
    decays = sum(1 for milestone in milestones if milestone <= epoch)
    return base_lr * factor * gamma**decays


def warmup_step_lr(
    epoch: int,
    base_lr: float,
    step_size: int,
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    warmup_lr_init: float = 0.0,
) -> float:
    """Learning rate at ``epoch`` of a StepLR stepped at the end of every epoch, after an optional linear warm-up:
    ``warmup_lr_init + (base_lr - warmup_lr_init) epoch / warmup_epochs`` during the warm-up, then
    ``base_lr x gamma ** (epoch // step_size)`` (Cluster-Contrast: examples/cluster_contrast_train_usl.py).
    """
    if epoch < 0 or warmup_epochs < 0 or step_size < 1:
        raise ValueError(f"warmup_step_lr: need epoch >= 0, warmup_epochs >= 0 and step_size >= 1, got {epoch}, "
                         f"{warmup_epochs}, {step_size}")
    if epoch < warmup_epochs:
        return warmup_lr_init + (base_lr - warmup_lr_init) * epoch / warmup_epochs
    return base_lr * gamma ** (epoch // step_size)


def save_schedules(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Write a run's per-iteration schedules (``lr=``, ``weight_decay=``, ...; row ``i`` is iteration ``i + 1``)
    to an ``.npz`` file, atomically (temporary file, then rename). ``numpy.load`` reads them back."""
    return atomic_write(path, lambda handle: np.savez(handle, **{name: np.asarray(values)
                                                                 for name, values in arrays.items()}),
                        what="schedules file")
